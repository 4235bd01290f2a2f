/**
 * The door of the `billing_records` and `line_items` tables: records are
 * created here (manual ones, and the usage records of an ingestion run with
 * their line items), and move from status to status only through `apply`,
 * guarded by the status and attempt count they were read with, so a record
 * that another charger moved first is never moved twice (StaleRecord).
 *
 * A usage record is reserved `staging` when its run first bills its user. When
 * the run has read its whole file, its records are prepared (description and
 * line items; still staging, amount 0), then sealed: their amount becomes the
 * sum of their lines, and they are due at once. Both happen in bounded
 * transactions. A staging record is invisible and owes nothing: never charged,
 * never listed, NOT_FOUND by id, amount 0 (it adds nothing to an unpaid total).
 *
 * Each change appends its event in the same transaction: billing_record.created
 * when a record becomes visible (createManual, sealUsageRecords; a staging
 * record has none), and billing_record.paid / retry_scheduled / failed for
 * each transition `apply` writes (ref_id = the record's id).
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Database, Read, Tx } from '../db/database';
import { epochMs, int64 } from '../db/types';
import type { EventsRepository } from '../events/events.repository';
import type { NewEvent } from '../events/events.types';
import { notFound } from '../shared/errors';
import { pageOf, type Page } from '../shared/paging';
import { BillingRecord, LineItem, type BillingRecordStatus } from './billing-record.entity';
import type { ChargeDecision } from './charge-decision';
import { INSUFFICIENT_FUNDS } from './charge-decision';

export interface RecordView {
  record: BillingRecord;
  lineItems: LineItem[];
}

/** A record as a charge attempt reads it. */
export interface ChargeRow {
  id: number;
  userId: number;
  amount: bigint;
  status: BillingRecordStatus;
  attemptCount: number;
  nextAttemptAt: Date | null;
}

/** A decided attempt on a record, to be written by `apply`. */
export interface Transition {
  row: ChargeRow;
  decision: Extract<ChargeDecision, { action: 'CHARGE' | 'RETRY' | 'FAIL' }>;
}

/** One line of a usage record: a service's total quantity, its unit price and its amount. */
export interface LineDraft {
  service: string;
  quantity: bigint;
  unitPrice: bigint;
  amount: bigint;
}

/** What a staging usage record is prepared with before its run seals it; its amount will be the sum of its lines. */
export interface UsageRecordDraft {
  id: number;
  description: string;
  lines: LineDraft[];
}

/** A record changed between its read and its write: read it again. */
export class StaleRecord extends Error {
  override readonly name = 'StaleRecord';
}

export interface BillingRecordsRepository {
  /** Inserts a MANUAL record, PENDING and due at once (the scheduler makes its first attempt if nobody else does). */
  createManual(tx: Tx, userId: number, amount: bigint, description: string, now: Date): Promise<number>;
  /**
   * Inserts one staging USAGE record per user for an ingestion run (amount 0,
   * PENDING, not due), so usage rows can point at it before its lines are
   * known; prepareUsageRecords writes its lines, sealUsageRecords its amount.
   */
  reserveUsageRecords(tx: Tx, userIds: readonly number[], jobRunId: number, now: Date): Promise<Map<number, number>>;
  /** Writes the description and line items of staging records (they stay staging, amount 0); throws if one is not staging. */
  prepareUsageRecords(tx: Tx, records: readonly UsageRecordDraft[]): Promise<void>;
  /**
   * Makes prepared staging records visible and due at `now`, each with the sum
   * of its lines as its amount, and appends their billing_record.created
   * events; throws if one is not staging. Returns their users.
   */
  sealUsageRecords(tx: Tx, ids: readonly number[], now: Date): Promise<number[]>;
  /** Up to `limit` staging records of the run, in id order. */
  stagingIds(tx: Tx, jobRunId: number, limit: number): Promise<number[]>;
  /**
   * Deletes the staging records of a run that will never seal them, with
   * their line items (its usage rows are gone first); returns how many.
   */
  discardStaging(tx: Tx, jobRunId: number): Promise<number>;
  /** A record and its lines as committed now, or NOT_FOUND. */
  view(id: number): Promise<RecordView>;
  list(
    em: EntityManager,
    filter: { userId: number | null; status: BillingRecordStatus | null },
    page: Page,
  ): Promise<{ items: RecordView[]; nextPageToken: string }>;
  /** True when the user has a record that is not PAID (in `tx`). */
  hasUnpaid(tx: Tx, userId: number): Promise<boolean>;
  /** The user's unpaid records, oldest first (committed read). */
  unpaidIds(userId: number): Promise<number[]>;
  /** What the user's unpaid (PENDING or FAILED) records add up to (committed read). */
  unpaidTotal(userId: number, read?: Read): Promise<bigint>;
  /** unpaidTotal of each of `userIds` in `tx` (0 for a user without unpaid records). */
  unpaidTotals(tx: Tx, userIds: readonly number[]): Promise<Map<number, bigint>>;
  /**
   * The records to attempt, locked until `tx` ends on PostgreSQL (id order).
   * `due`: only PENDING records due at `due`, skipping rows another replica holds.
   */
  readForCharge(tx: Tx, ids: readonly number[], due?: Date): Promise<ChargeRow[]>;
  /** Writes decided attempts, each guarded by what it was read as; throws StaleRecord when any guard fails. */
  apply(tx: Tx, transitions: readonly Transition[], now: Date): Promise<void>;
  /** Up to `limit` PENDING records due at `now`, most overdue first (ids not in `skip`). */
  dueIds(em: EntityManager, now: Date, limit: number): Promise<number[]>;
  /** When the earliest scheduled retry is due, or null. */
  nextDueTime(em: EntityManager): Promise<Date | null>;
  /** How many records wait PENDING for a retry (attempted at least once), committed now; one read, no write. */
  countPendingRetries(): Promise<number>;
  /**
   * Users with an unpaid record (already attempted: new records are charged by
   * whoever created them) that their open wallet can pay now.
   */
  settleableUsers(limit: number): Promise<number[]>;
}


/** The two columns of unpaidColumns. */
export type UnpaidColumns = { unpaid_hi: string | null; unpaid_lo: string | null };
/**
 * A user's unpaid total as two columns of a select list, unpaid_hi and
 * unpaid_lo (sums of the amounts' 32-bit halves, exact on both databases),
 * for the user whose id is the SQL `userId` (a placeholder or a column): so a
 * read of another table can take it in the same statement, one snapshot
 * (GetBalance, ledger.readWithOwed). Read back with unpaidOf.
 */
export const unpaidColumns = (userId: string): string =>
  `(select cast(coalesce(sum(amount / 4294967296), 0) as text) from billing_records where user_id = ${userId} and status <> 'PAID') as unpaid_hi,
   (select cast(coalesce(sum(amount % 4294967296), 0) as text) from billing_records where user_id = ${userId} and status <> 'PAID') as unpaid_lo`;
export const unpaidOf = (row: UnpaidColumns): bigint => BigInt(row.unpaid_hi ?? '0') * 4294967296n + BigInt(row.unpaid_lo ?? '0');

type RecordRow = {
  id: number | string;
  user_id: number | string;
  kind: BillingRecord['kind'];
  amount: string;
  status: BillingRecordStatus;
  description: string;
  attempt_count: number | string;
  next_attempt_at: number | string | null;
  failure_reason: string;
  job_run_id: number | string | null;
  created_at: number | string;
  updated_at: number | string;
  paid_at: number | string | null;
  staging: number | boolean;
};

type LineRow = { id: number | string; billing_record_id: number | string; service: string; quantity: string; unit_price: string; amount: string };

/**
 * A record read on a reader connection (the hot read of GetBillingRecord and
 * ProcessBillingRecord), as the ORM would load it: 64-bit columns come as text,
 * instants as epoch ms.
 */
function toRecord(r: RecordRow): BillingRecord {
  return Object.assign(new BillingRecord(), {
    id: Number(r.id),
    userId: Number(r.user_id),
    kind: r.kind,
    amount: int64(r.amount),
    status: r.status,
    description: r.description,
    attemptCount: Number(r.attempt_count),
    nextAttemptAt: r.next_attempt_at === null ? null : epochMs(r.next_attempt_at),
    failureReason: r.failure_reason,
    jobRunId: r.job_run_id === null ? null : Number(r.job_run_id),
    createdAt: epochMs(r.created_at),
    updatedAt: epochMs(r.updated_at),
    paidAt: r.paid_at === null ? null : epochMs(r.paid_at),
    staging: r.staging === true || r.staging === 1,
  });
}

function toLineItem(l: LineRow): LineItem {
  return Object.assign(new LineItem(), {
    id: Number(l.id),
    billingRecordId: Number(l.billing_record_id),
    service: l.service,
    quantity: int64(l.quantity),
    unitPrice: int64(l.unit_price),
    amount: int64(l.amount),
  });
}

/** Rows per set-based statement (at most 5 parameters a row). */
const SET_ROWS = 1000;

function chargeRow(r: { id: number | string; user_id: number | string; amount: string; status: BillingRecordStatus; attempt_count: number | string; next_attempt_at: number | string | null }): ChargeRow {
  return {
    id: Number(r.id),
    userId: Number(r.user_id),
    amount: int64(r.amount),
    status: r.status,
    attemptCount: Number(r.attempt_count),
    nextAttemptAt: r.next_attempt_at === null ? null : epochMs(r.next_attempt_at),
  };
}

/** The event of a transition `apply` wrote. */
function transitionEvent({ row, decision }: Transition): NewEvent {
  const base = { userId: row.userId, refId: row.id };
  switch (decision.action) {
    case 'CHARGE':
      return { ...base, type: 'billing_record.paid', payload: { billingRecordId: row.id, amount: row.amount, attemptCount: decision.attemptCount } };
    case 'RETRY':
      return {
        ...base,
        type: 'billing_record.retry_scheduled',
        payload: { billingRecordId: row.id, attemptCount: decision.attemptCount, nextAttemptTime: decision.nextAttemptAt, reason: INSUFFICIENT_FUNDS },
      };
    case 'FAIL':
      return { ...base, type: 'billing_record.failed', payload: { billingRecordId: row.id, attemptCount: decision.attemptCount, reason: INSUFFICIENT_FUNDS } };
  }
}

const placeholders = (n: number): string => Array.from({ length: n }, () => '?').join(', ');

/**
 * SQLite: not a record an ingestion run sealed and has not charged yet while
 * that run is still RUNNING (never attempted, of a RUNNING job run). The run
 * charges those itself, 500 to a transaction, right after sealing them; they
 * are due at once so that the retry scheduler charges them should the run
 * die. A look of the scheduler between the run's transactions took them 5,000
 * to a transaction instead, outside the run's counts. On SQLite one process
 * owns the database and closes the runs a crash cut off at its start, so a
 * RUNNING run is a live one. On PostgreSQL a dead replica's run stays RUNNING
 * until its lease (60 s) runs out: excluding its records there delayed their
 * charge by that long after a crash (the crash test found it), so PostgreSQL
 * keeps the race, whose charges the row locks keep exactly-once.
 */
const NOT_A_RUNNING_RUNS_OWN = ` and not (attempt_count = 0 and job_run_id is not null and exists (select 1 from job_runs j where j.id = billing_records.job_run_id and j.status = 'RUNNING'))`;

export function createBillingRecordsRepository(db: Database, events: EventsRepository): BillingRecordsRepository {
  const notARunningRunsOwn = db.dialect === 'sqlite' ? NOT_A_RUNNING_RUNS_OWN : '';
  /** Moves each record of `list` from its read state with `set` (v.* are the per-row values). */
  async function moveMany(tx: Tx, list: readonly Transition[], set: string, setParams: unknown[], extra: (t: Transition) => unknown[], extraCols: string[]): Promise<void> {
    const cols = ['id', 'read_status', 'read_attempts', 'attempts', ...extraCols];
    for (let i = 0; i < list.length; i += SET_ROWS) {
      const part = list.slice(i, i + SET_ROWS);
      const row = `(cast(? as bigint), cast(? as text), cast(? as bigint), cast(? as bigint)${extraCols.map(() => ', cast(? as bigint)').join('')})`;
      const changed = await tx.run(
        `update billing_records set ${set}
         from (select ${cols.map((c, k) => `column${k + 1} as ${c}`).join(', ')} from (values ${part.map(() => row).join(', ')}) as t) as v
         where billing_records.id = v.id and billing_records.status = v.read_status and billing_records.attempt_count = v.read_attempts`,
        [...setParams, ...part.flatMap((t) => [t.row.id, t.row.status, t.row.attemptCount, t.decision.attemptCount, ...extra(t)])],
        // One record, or a full part: fixed texts, kept prepared (preparing 1,000 rows' worth took a fifth of a batch).
        { keep: part.length === 1 || part.length === SET_ROWS },
      );
      if (changed !== part.length) throw new StaleRecord();
    }
  }

  return {
    async createManual(tx, userId, amount, description, now) {
      const [row] = await tx.all<{ id: number | string }>(
        `insert into billing_records (user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, created_at, updated_at)
         values (?, 'MANUAL', cast(? as bigint), 'PENDING', ?, 0, ?, '', ?, ?) returning id`,
        [userId, amount.toString(), description, now.getTime(), now.getTime(), now.getTime()],
        { keep: true },
      );
      const id = Number(row.id);
      await events.append(tx, [{ type: 'billing_record.created', userId, refId: id, payload: { billingRecordId: id, amount, jobRunId: 0 } }], now);
      return id;
    },

    async reserveUsageRecords(tx, userIds, jobRunId, now) {
      const ids = await db.allocateIds(tx, 'billing_records', userIds.length);
      const recordOf = new Map(userIds.map((u, i) => [u, ids[i]]));
      const at = now.getTime();
      for (let i = 0; i < userIds.length; i += 500) {
        const part = userIds.slice(i, i + 500);
        await tx.run(
          `insert into billing_records (id, user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, job_run_id, created_at, updated_at, staging)
           values ${part.map(() => `(?, ?, 'USAGE', 0, 'PENDING', '', 0, null, '', ?, ?, ?, ?)`).join(', ')}`,
          part.flatMap((userId) => [recordOf.get(userId), userId, jobRunId, at, at, true]),
        );
      }
      return recordOf;
    },

    async prepareUsageRecords(tx, records) {
      for (let i = 0; i < records.length; i += SET_ROWS) {
        const part = records.slice(i, i + SET_ROWS);
        const changed = await tx.run(
          `update billing_records set description = v.description
           from (select column1 as id, column2 as description from (values ${part.map(() => '(cast(? as bigint), ?)').join(', ')}) as t) as v
           where billing_records.id = v.id and billing_records.staging = ?`,
          [...part.flatMap((r) => [r.id, r.description]), true],
        );
        if (changed !== part.length) throw new Error('billing records of this run changed while ingesting; run aborted');
      }
      const lines = records.flatMap((r) => r.lines.map((l) => [r.id, l.service, l.quantity.toString(), l.unitPrice.toString(), l.amount.toString()]));
      for (let i = 0; i < lines.length; i += SET_ROWS) {
        const part = lines.slice(i, i + SET_ROWS);
        await tx.run(
          `insert into line_items (billing_record_id, service, quantity, unit_price, amount)
           values ${part.map(() => '(?, ?, cast(? as bigint), cast(? as bigint), cast(? as bigint))').join(', ')}`,
          part.flat(),
          { keep: part.length === SET_ROWS },
        );
      }
    },

    async sealUsageRecords(tx, ids, now) {
      const at = now.getTime();
      const created: NewEvent[] = [];
      const users: number[] = [];
      for (let i = 0; i < ids.length; i += SET_ROWS) {
        const part = ids.slice(i, i + SET_ROWS);
        // Due at once: the run charges them next, and if it dies first the retry scheduler does. The amount is
        // the sum of the lines prepared (each within INT64_MAX, and so is their sum: the run checked).
        const sealed = await tx.all<{ id: number | string; user_id: number | string; amount: string; job_run_id: number | string | null }>(
          `update billing_records
           set amount = (select coalesce(sum(li.amount), 0) from line_items li where li.billing_record_id = billing_records.id),
               staging = ?, next_attempt_at = ?, created_at = ?, updated_at = ?
           where id in (${placeholders(part.length)}) and staging = ?
           returning id, user_id, cast(amount as text) as amount, job_run_id`,
          [false, at, at, at, ...part, true],
          { keep: part.length === SET_ROWS },
        );
        if (sealed.length !== part.length) throw new Error('billing records of this run changed while ingesting; run aborted');
        for (const row of sealed) {
          const id = Number(row.id);
          const jobRunId = row.job_run_id === null ? 0 : Number(row.job_run_id);
          created.push({ type: 'billing_record.created', userId: Number(row.user_id), refId: id, payload: { billingRecordId: id, amount: int64(row.amount), jobRunId } });
          users.push(Number(row.user_id));
        }
      }
      // The records become visible now: their events go in the same transaction, in record order.
      created.sort((a, b) => a.refId! - b.refId!);
      await events.append(tx, created, now);
      return users;
    },

    async stagingIds(tx, jobRunId, limit) {
      // `staging` as written in billing_records_staging_idx's predicate, so that the index serves it.
      const rows = await tx.all<{ id: number | string }>('select id from billing_records where job_run_id = ? and staging order by id limit ?', [jobRunId, limit]);
      return rows.map((r) => Number(r.id));
    },

    async discardStaging(tx, jobRunId) {
      await tx.run('delete from line_items where billing_record_id in (select id from billing_records where job_run_id = ? and staging)', [jobRunId]);
      return tx.run('delete from billing_records where job_run_id = ? and staging', [jobRunId]);
    },

    async view(id) {
      const rows = await db.read<RecordRow>(
        `select id, user_id, kind, cast(amount as text) as amount, status, description, attempt_count, next_attempt_at,
                failure_reason, job_run_id, created_at, updated_at, paid_at, staging
         from billing_records where id = ? and staging = ?`,
        [id, false],
      );
      if (rows.length === 0) throw notFound('BILLING_RECORD_NOT_FOUND', `billing record ${id} not found`);
      const lines = await db.read<LineRow>(
        `select id, billing_record_id, service, cast(quantity as text) as quantity, cast(unit_price as text) as unit_price,
                cast(amount as text) as amount
         from line_items where billing_record_id = ? order by id`,
        [id],
      );
      return { record: toRecord(rows[0]), lineItems: lines.map(toLineItem) };
    },

    async list(em, filter, page) {
      const records = await em.find(
        BillingRecord,
        {
          id: { $gt: page.afterId },
          staging: false,
          ...(filter.userId !== null ? { userId: filter.userId } : {}),
          ...(filter.status !== null ? { status: filter.status } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      const { items, nextPageToken } = pageOf(records, page);
      const lines = items.length ? await em.find(LineItem, { billingRecordId: { $in: items.map((r) => r.id) } }, { orderBy: { id: 'asc' } }) : [];
      const byRecord = new Map<number, LineItem[]>();
      for (const line of lines) {
        const list = byRecord.get(line.billingRecordId) ?? [];
        list.push(line);
        byRecord.set(line.billingRecordId, list);
      }
      return { items: items.map((record) => ({ record, lineItems: byRecord.get(record.id) ?? [] })), nextPageToken };
    },

    async hasUnpaid(tx, userId) {
      const rows = await tx.all(`select 1 as x from billing_records where user_id = ? and status <> 'PAID' limit 1`, [userId], { keep: true });
      return rows.length > 0;
    },

    async unpaidIds(userId) {
      const rows = await db.read<{ id: number | string }>(
        `select id from billing_records where user_id = ? and status <> 'PAID' and staging = ? order by id`,
        [userId, false],
      );
      return rows.map((r) => Number(r.id));
    },

    async unpaidTotal(userId, read = (sql, params) => db.read(sql, params)) {
      const [row] = await read<UnpaidColumns>(`select ${unpaidColumns('?')}`, [userId, userId]);
      return unpaidOf(row);
    },

    async unpaidTotals(tx, userIds) {
      const totals = new Map<number, bigint>(userIds.map((id) => [id, 0n]));
      for (let i = 0; i < userIds.length; i += 500) {
        const part = userIds.slice(i, i + 500);
        const rows = await tx.all<{ user_id: number | string; hi: string; lo: string }>(
          `select user_id, cast(sum(amount / 4294967296) as text) as hi, cast(sum(amount % 4294967296) as text) as lo
           from billing_records where user_id in (${part.map(() => '?').join(', ')}) and status <> 'PAID' group by user_id`,
          part,
          { keep: part.length === 1 },
        );
        for (const r of rows) totals.set(Number(r.user_id), BigInt(r.hi) * 4294967296n + BigInt(r.lo));
      }
      return totals;
    },

    async readForCharge(tx, ids, due) {
      const rows = await tx.all<Parameters<typeof chargeRow>[0]>(
        `select id, user_id, cast(amount as text) as amount, status, attempt_count, next_attempt_at
         from billing_records where id in (${placeholders(ids.length)}) and staging = ?${due ? ` and status = 'PENDING' and next_attempt_at <= ?` : ''}
         order by id${due ? db.forUpdateSkipLocked() : db.forUpdate()}`,
        due ? [...ids, false, due.getTime()] : [...ids, false],
        { keep: ids.length === 1 },
      );
      return rows.map(chargeRow);
    },

    async apply(tx, transitions, now) {
      const at = now.getTime();
      const of = (action: Transition['decision']['action']) => transitions.filter((t) => t.decision.action === action);
      await moveMany(
        tx,
        of('CHARGE'),
        `status = 'PAID', paid_at = ?, updated_at = ?, attempt_count = v.attempts, next_attempt_at = null, failure_reason = ''`,
        [at, at],
        () => [],
        [],
      );
      await moveMany(
        tx,
        of('RETRY'),
        `attempt_count = v.attempts, next_attempt_at = v.next_attempt_at, failure_reason = ?, updated_at = ?`,
        [INSUFFICIENT_FUNDS, at],
        (t) => [t.decision.action === 'RETRY' ? t.decision.nextAttemptAt.getTime() : null],
        ['next_attempt_at'],
      );
      await moveMany(
        tx,
        of('FAIL'),
        `status = 'FAILED', attempt_count = v.attempts, next_attempt_at = null, failure_reason = ?, updated_at = ?`,
        [INSUFFICIENT_FUNDS, at],
        () => [],
        [],
      );
      await events.append(tx, transitions.map(transitionEvent), now);
    },

    async dueIds(em, now, limit) {
      const rows = await em.execute<{ id: number | string }[]>(
        `select id from billing_records where status = 'PENDING' and next_attempt_at <= ?${notARunningRunsOwn} order by next_attempt_at, id limit ${Math.floor(limit)}`,
        [now.getTime()],
      );
      return rows.map((r) => Number(r.id));
    },

    async nextDueTime(em) {
      const rows = await em.execute<{ at: number | string | null }[]>(
        `select min(next_attempt_at) as at from billing_records where status = 'PENDING'${notARunningRunsOwn}`,
      );
      const at = rows[0]?.at;
      return at === null || at === undefined ? null : epochMs(at);
    },

    async countPendingRetries() {
      const [row] = await db.read<{ n: number | string }>(
        `select count(*) as n from billing_records where status = 'PENDING' and attempt_count > 0`,
        [],
      );
      return Number(row?.n ?? 0);
    },

    async settleableUsers(limit) {
      const rows = await db.read<{ user_id: number | string }>(
        `select distinct r.user_id from billing_records r join wallets w on w.user_id = r.user_id
         where r.status <> 'PAID' and r.attempt_count > 0 and w.closed_at is null and w.balance >= r.amount
         order by r.user_id limit ?`,
        [limit],
      );
      return rows.map((r) => Number(r.user_id));
    },
  };
}
