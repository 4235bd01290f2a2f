/**
 * The billing engine's money path: records, charges, retries, settlement and
 * suspension. A charge is one transaction: a conditional debit of the wallet
 * (never below zero), a DEBIT ledger row (unique per record) and the record's
 * move to PAID guarded by the state it was read in. A record is therefore
 * charged at most once, whoever triggers it, however concurrently.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import { checkRequestId, findIdempotent, requestHash, saveIdempotent } from '../db/idempotency';
import { isUniqueViolation } from '../db/errors';
import { isPostgres } from '../db/platform';
import { rawRead, rawSql, type RawSql } from '../db/raw';
import { epochMs, int64 } from '../db/types';
import type { Clock } from '../shared/clock';
import { invalidArgument, notFound } from '../shared/errors';
import { pageOf, readPage } from '../shared/paging';
import { UsageLog } from '../usage/usage-log.entity';
import { getLiveUser } from '../users/users.service';
import { debitWallet, holdOpenWallet } from '../wallets/wallets.service';
import { BillingRecord, LineItem, type BillingRecordStatus } from './billing-record.entity';
import type { BillingService, ChargeOutcome, ChargeResult, RecordView, RetryCounts } from './billing.types';
import { nextAttemptDelayMs, type RetryPolicy } from './retry-policy';

export interface BillingDeps extends RetryPolicy {
  clock: Clock;
  log: Logger;
  pricing: ReadonlyMap<string, bigint>;
  /** Told whenever a retry is scheduled, so the in-process scheduler can wake up in time. */
  onRetryScheduled?: (at: Date) => void;
}

/** Why a charge attempt runs: it decides what a short balance does. */
type ChargeMode =
  | 'new' // first attempt of a new record; a failure counts and schedules retry 1
  | 'retry' // the scheduler: only if still PENDING and due
  | 'manual' // ProcessBillingRecord: now, whatever the schedule
  | 'settle'; // after a top-up: a short balance changes nothing

type RecordRow = {
  id: number | string;
  user_id: number | string;
  amount: string;
  status: BillingRecordStatus;
  attempt_count: number | string;
  next_attempt_at: number | string | null;
};

type ViewRow = {
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
};

/** The record changed under us between read and write; read again. */
class StaleRecord extends Error {}

const MAX_DESCRIPTION = 500;
/** Records charged per transaction by the batched path (3 parameters per record in its largest statement: 15,000). */
const BATCH = 5000;
/** Ledger rows per multi-row INSERT (5 parameters each). */
const LEDGER_ROWS = 1000;

type BatchResult = { counts: RetryCounts; outcomes: Record<ChargeOutcome, number[]>; retryAt: Date | null };
export const INSUFFICIENT_FUNDS = 'INSUFFICIENT_FUNDS';

const emptyRetryCounts = (): RetryCounts => ({ chargesSucceeded: 0, retriesScheduled: 0, recordsFailed: 0, usersSuspended: 0 });

function tally(counts: RetryCounts, r: { outcome: ChargeOutcome | 'SKIPPED'; userSuspended: boolean }): void {
  if (r.outcome === 'CHARGED') counts.chargesSucceeded++;
  else if (r.outcome === 'RETRY_SCHEDULED') counts.retriesScheduled++;
  else if (r.outcome === 'FAILED') counts.recordsFailed++;
  if (r.userSuspended) counts.usersSuspended++;
}

export function createBillingService(deps: BillingDeps): BillingService {
  const { clock, log } = deps;

  /** A record and its lines as committed now (two prepared reads; no unit of work involved). */
  async function view(em: EntityManager, id: number): Promise<RecordView> {
    const rows = await rawRead<ViewRow>(
      em,
      `select id, user_id, kind, cast(amount as text) as amount, status, description, attempt_count, next_attempt_at,
              failure_reason, job_run_id, created_at, updated_at, paid_at
       from billing_records where id = ?`,
      [id],
    );
    if (rows.length === 0) throw notFound('BILLING_RECORD_NOT_FOUND', `billing record ${id} not found`);
    const r = rows[0];
    const record = new BillingRecord();
    record.id = Number(r.id);
    record.userId = Number(r.user_id);
    record.kind = r.kind;
    record.amount = int64(r.amount);
    record.status = r.status;
    record.description = r.description;
    record.attemptCount = Number(r.attempt_count);
    record.nextAttemptAt = r.next_attempt_at === null ? null : epochMs(r.next_attempt_at);
    record.failureReason = r.failure_reason;
    record.jobRunId = r.job_run_id === null ? null : Number(r.job_run_id);
    record.createdAt = epochMs(r.created_at);
    record.updatedAt = epochMs(r.updated_at);
    record.paidAt = r.paid_at === null ? null : epochMs(r.paid_at);
    const lines = await rawRead<{ id: number | string; service: string; quantity: string; unit_price: string; amount: string }>(
      em,
      `select id, service, cast(quantity as text) as quantity, cast(unit_price as text) as unit_price, cast(amount as text) as amount
       from line_items where billing_record_id = ? order by id`,
      [id],
    );
    const lineItems = lines.map((l) => {
      const item = new LineItem();
      item.id = Number(l.id);
      item.billingRecordId = record.id;
      item.service = l.service;
      item.quantity = int64(l.quantity);
      item.unitPrice = int64(l.unit_price);
      item.amount = int64(l.amount);
      return item;
    });
    return { record, lineItems };
  }

  async function readRow(tx: EntityManager, id: number, mode: ChargeMode, now: Date): Promise<RecordRow | undefined> {
    const due = mode === 'retry' ? ` and status = 'PENDING' and next_attempt_at <= ${now.getTime()}` : '';
    // PostgreSQL: lock the row so concurrent chargers queue; the scheduler skips rows another replica holds.
    const lock = isPostgres(tx) ? (mode === 'retry' ? ' for update skip locked' : ' for update') : '';
    const rows = await tx.execute<RecordRow[]>(
      `select id, user_id, cast(amount as text) as amount, status, attempt_count, next_attempt_at
       from billing_records where id = ?${due}${lock}`,
      [id],
    );
    return rows[0];
  }

  /** Moves the record on, guarded by the status and attempt count it was read with. */
  async function updateRecord(tx: EntityManager, row: RecordRow, set: string, params: unknown[]): Promise<void> {
    const res = await tx.execute<{ affectedRows: number }>(
      `update billing_records set ${set} where id = ? and status = ? and attempt_count = ?`,
      [...params, row.id, row.status, row.attempt_count],
      'run',
    );
    if (res.affectedRows !== 1) throw new StaleRecord();
  }

  /** Reactivates a user suspended for non-payment once nothing is unpaid. */
  async function reactivateIfSettled(tx: EntityManager, userId: number, now: Date): Promise<void> {
    await tx.execute(
      `update users set status = 'ACTIVE', suspension_reason = '', suspended_for_non_payment = ?, updated_at = ?
       where id = ? and status = 'SUSPENDED' and suspended_for_non_payment = ?
         and not exists (select 1 from billing_records where user_id = ? and status <> 'PAID')`,
      [false, now.getTime(), userId, true, userId],
      'run',
    );
  }

  async function attempt(
    em: EntityManager,
    id: number,
    mode: ChargeMode,
  ): Promise<{ outcome: ChargeOutcome | 'SKIPPED'; userSuspended: boolean; retryAt: Date | null }> {
    return em.transactional(async (tx) => {
      const now = clock.now();
      const row = await readRow(tx, id, mode, now);
      if (!row) {
        if (mode === 'retry') return { outcome: 'SKIPPED', userSuspended: false, retryAt: null };
        throw notFound('BILLING_RECORD_NOT_FOUND', `billing record ${id} not found`);
      }
      if (row.status === 'PAID') return { outcome: 'ALREADY_PAID', userSuspended: false, retryAt: null };
      // The scheduler may have made the first attempt of a record due at creation already.
      if (mode === 'new' && Number(row.attempt_count) > 0) return { outcome: 'SKIPPED', userSuspended: false, retryAt: null };
      const userId = Number(row.user_id);
      const amount = int64(row.amount);
      // attempt_count counts the attempts of the charge schedule (the first, the retries, manual ones); a
      // settlement after a top-up is not one of them, paid or not.
      const attempts = Number(row.attempt_count) + (mode === 'settle' ? 0 : 1);
      const paid = amount === 0n || (await debitWallet(tx, userId, amount, Number(row.id), now)) !== null;
      if (paid) {
        await updateRecord(
          tx,
          row,
          `status = 'PAID', paid_at = ?, updated_at = ?, attempt_count = ?, next_attempt_at = null, failure_reason = ''`,
          [now.getTime(), now.getTime(), attempts],
        );
        await reactivateIfSettled(tx, userId, now);
        return { outcome: 'CHARGED', userSuspended: false, retryAt: null };
      }
      if (mode === 'settle') return { outcome: 'SKIPPED', userSuspended: false, retryAt: null };
      if (row.status === 'FAILED') {
        await updateRecord(tx, row, 'attempt_count = ?, failure_reason = ?, updated_at = ?', [attempts, INSUFFICIENT_FUNDS, now.getTime()]);
        return { outcome: 'FAILED', userSuspended: false, retryAt: null };
      }
      const delay = nextAttemptDelayMs(deps, attempts);
      if (delay !== null) {
        const retryAt = new Date(now.getTime() + delay);
        await updateRecord(tx, row, 'attempt_count = ?, next_attempt_at = ?, failure_reason = ?, updated_at = ?', [
          attempts,
          retryAt.getTime(),
          INSUFFICIENT_FUNDS,
          now.getTime(),
        ]);
        return { outcome: 'RETRY_SCHEDULED', userSuspended: false, retryAt };
      }
      await updateRecord(tx, row, `status = 'FAILED', attempt_count = ?, next_attempt_at = null, failure_reason = ?, updated_at = ?`, [
        attempts,
        INSUFFICIENT_FUNDS,
        now.getTime(),
      ]);
      const suspended = await tx.execute<{ affectedRows: number }>(
        `update users set status = 'SUSPENDED', suspension_reason = ?, suspended_for_non_payment = ?, updated_at = ?
         where id = ? and status = 'ACTIVE'`,
        [`non-payment: billing record ${id} failed after ${attempts} attempts`, true, now.getTime(), userId],
        'run',
      );
      return { outcome: 'FAILED', userSuspended: suspended.affectedRows === 1, retryAt: null };
    });
  }

  /** One charge attempt, re-read and re-tried when another charger moved the record first. */
  async function charge(em: EntityManager, id: number, mode: ChargeMode) {
    for (let round = 0; ; round++) {
      try {
        const result = await attempt(em, id, mode);
        if (result.retryAt) deps.onRetryScheduled?.(result.retryAt);
        if (result.outcome !== 'SKIPPED') log.info({ billingRecordId: id, mode, outcome: result.outcome }, 'charge attempt');
        return result;
      } catch (err) {
        // StaleRecord, or the unique debit index refusing a second debit for the record.
        if ((err instanceof StaleRecord || isUniqueViolation(err)) && round < 10) continue;
        throw err;
      }
    }
  }

  async function chargeAndView(em: EntityManager, id: number, mode: ChargeMode): Promise<ChargeResult> {
    const result = await charge(em, id, mode);
    const v = await view(em, id);
    const outcome: ChargeOutcome = result.outcome === 'SKIPPED' ? outcomeOf(v.record.status) : result.outcome;
    return { ...v, outcome, userSuspended: result.userSuspended };
  }

  async function chargeMany(em: EntityManager, ids: readonly number[], mode: ChargeMode): Promise<RetryCounts> {
    const counts = emptyRetryCounts();
    for (const id of ids) tally(counts, await charge(em, id, mode));
    return counts;
  }

  /**
   * The first attempt of new records, or the due retries, `BATCH` records per
   * transaction: the same rules as `attempt`, applied record by record in the
   * given order in memory, then written with a few set-based statements (one
   * commit instead of one per record). Every write stays guarded: the debit is
   * the conditional UPDATE per wallet, the ledger's unique index allows one
   * DEBIT per record, and each record moves only from the state it was read
   * in. If any guard does not hold (another charger got there first), the
   * batch rolls back and its records go through `charge` one by one.
   */
  async function chargeBatched(em: EntityManager, ids: readonly number[], mode: 'new' | 'retry'): Promise<RetryCounts> {
    const counts = emptyRetryCounts();
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      let result: BatchResult;
      try {
        result = await em.transactional((tx) => attemptBatch(tx, chunk, mode));
      } catch (err) {
        if (!(err instanceof StaleRecord || isUniqueViolation(err))) throw err;
        log.info({ records: chunk.length, mode }, 'batch charge met a concurrent change; charging one by one');
        const one = await chargeMany(em, chunk, mode);
        for (const k of Object.keys(one) as (keyof RetryCounts)[]) counts[k] += one[k];
        continue;
      }
      for (const k of Object.keys(result.counts) as (keyof RetryCounts)[]) counts[k] += result.counts[k];
      if (result.retryAt) deps.onRetryScheduled?.(result.retryAt);
      for (const [outcome, list] of Object.entries(result.outcomes)) {
        for (const id of list) log.debug({ billingRecordId: id, mode, outcome }, 'charge attempt');
      }
      log.info({ mode, records: chunk.length, ...result.counts }, 'charge attempts (batch)');
    }
    return counts;
  }

  async function attemptBatch(tx: EntityManager, ids: readonly number[], mode: 'new' | 'retry'): Promise<BatchResult> {
    const sql = await rawSql(tx);
    try {
      return await attemptBatchWith(tx, sql, ids, mode);
    } finally {
      await sql.close();
    }
  }

  async function attemptBatchWith(tx: EntityManager, sql: RawSql, ids: readonly number[], mode: 'new' | 'retry'): Promise<BatchResult> {
    const now = clock.now();
    const at = now.getTime();
    const pg = isPostgres(tx);
    const counts = emptyRetryCounts();
    const outcomes: Record<ChargeOutcome, number[]> = { CHARGED: [], ALREADY_PAID: [], RETRY_SCHEDULED: [], FAILED: [] };
    const due = mode === 'retry' ? ` and status = 'PENDING' and next_attempt_at <= ${at}` : '';
    // PostgreSQL: lock the records (id order), then the wallets (user order), as `attempt` does one at a time.
    const lock = pg ? (mode === 'retry' ? ' for update skip locked' : ' for update') : '';
    const read = await sql.all<RecordRow>(
      `select id, user_id, cast(amount as text) as amount, status, attempt_count, next_attempt_at
       from billing_records where id in (${ids.map(() => '?').join(', ')})${due} order by id${lock}`,
      [...ids],
    );
    const byId = new Map(read.map((r) => [Number(r.id), r]));
    const rows: RecordRow[] = [];
    for (const id of ids) {
      const row = byId.get(id);
      if (!row) continue; // retry: no longer due, or another replica holds it
      if (row.status === 'PAID') outcomes.ALREADY_PAID.push(id);
      else if (row.status !== 'PENDING' || (mode === 'new' && Number(row.attempt_count) > 0)) continue;
      else rows.push(row);
    }
    if (rows.length === 0) return { counts, outcomes, retryAt: null };

    const userIds = [...new Set(rows.map((r) => Number(r.user_id)))].sort((a, b) => a - b);
    const wallets = await sql.all<{ user_id: number | string; balance: string }>(
      `select user_id, cast(balance as text) as balance from wallets where user_id in (${userIds.map(() => '?').join(', ')})
       order by user_id${pg ? ' for update' : ''}`,
      userIds,
    );
    const balance = new Map(wallets.map((w) => [Number(w.user_id), int64(w.balance)]));
    const debited = new Map<number, bigint>();

    const paid: RecordRow[] = [];
    const ledger: unknown[][] = [];
    const scheduled: { row: RecordRow; next: number }[] = [];
    const failed: RecordRow[] = [];
    let retryAt: number | null = null;
    for (const row of rows) {
      const userId = Number(row.user_id);
      const amount = int64(row.amount);
      const attempts = Number(row.attempt_count) + 1;
      const have = balance.get(userId);
      if (amount === 0n) {
        paid.push(row);
      } else if (have !== undefined && have >= amount) {
        balance.set(userId, have - amount);
        debited.set(userId, (debited.get(userId) ?? 0n) + amount);
        paid.push(row);
        ledger.push([userId, amount.toString(), (have - amount).toString(), Number(row.id), at]);
      } else {
        const delay = nextAttemptDelayMs(deps, attempts);
        if (delay === null) {
          failed.push(row);
        } else {
          scheduled.push({ row, next: at + delay });
          retryAt = retryAt === null ? at + delay : Math.min(retryAt, at + delay);
        }
      }
    }

    if (debited.size > 0) {
      const users = [...debited.keys()];
      const updated = await sql.all<{ user_id: number | string; balance: string }>(
        `update wallets set balance = wallets.balance - v.amount, updated_at = ?
         from (select column1 as user_id, column2 as amount from (values ${users.map(() => '(cast(? as bigint), cast(? as bigint))').join(', ')}) as t) as v
         where wallets.user_id = v.user_id and wallets.balance >= v.amount and wallets.closed_at is null
         returning wallets.user_id, cast(wallets.balance as text) as balance`,
        [at, ...users.flatMap((u) => [u, debited.get(u)!.toString()])],
      );
      // Each wallet must end exactly where the in-memory replay says, else the balance moved under us.
      const ok = updated.length === users.length && updated.every((w) => int64(w.balance) === balance.get(Number(w.user_id)));
      if (!ok) throw new StaleRecord();
      for (let i = 0; i < ledger.length; i += LEDGER_ROWS) {
        const part = ledger.slice(i, i + LEDGER_ROWS);
        await sql.run(
          `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at)
           values ${part.map(() => `(?, 'DEBIT', cast(? as bigint), cast(? as bigint), ?, null, ?)`).join(', ')}`,
          part.flat(),
        );
      }
    }
    const moved = async (set: string, setParams: unknown[], list: { row: RecordRow; extra: unknown[] }[], extraCols: string[]) => {
      if (list.length === 0) return;
      const cols = ['id', 'attempt_count', ...extraCols];
      const changed = await sql.run(
        `update billing_records set ${set}
         from (select ${cols.map((c, i) => `column${i + 1} as ${c}`).join(', ')} from (values ${list
           .map(() => `(${cols.map(() => 'cast(? as bigint)').join(', ')})`)
           .join(', ')}) as t) as v
         where billing_records.id = v.id and billing_records.status = 'PENDING' and billing_records.attempt_count = v.attempt_count`,
        [...setParams, ...list.flatMap(({ row, extra }) => [Number(row.id), Number(row.attempt_count), ...extra])],
      );
      if (changed !== list.length) throw new StaleRecord();
    };
    await moved(
      `status = 'PAID', paid_at = ?, updated_at = ?, attempt_count = v.attempt_count + 1, next_attempt_at = null, failure_reason = ''`,
      [at, at],
      paid.map((row) => ({ row, extra: [] })),
      [],
    );
    await moved(
      `attempt_count = v.attempt_count + 1, next_attempt_at = v.next_attempt_at, failure_reason = ?, updated_at = ?`,
      [INSUFFICIENT_FUNDS, at],
      scheduled.map(({ row, next }) => ({ row, extra: [next] })),
      ['next_attempt_at'],
    );
    for (const row of failed) {
      const attempts = Number(row.attempt_count) + 1;
      await updateRecord(tx, row, `status = 'FAILED', attempt_count = ?, next_attempt_at = null, failure_reason = ?, updated_at = ?`, [
        attempts,
        INSUFFICIENT_FUNDS,
        at,
      ]);
      const suspended = await tx.execute<{ affectedRows: number }>(
        `update users set status = 'SUSPENDED', suspension_reason = ?, suspended_for_non_payment = ?, updated_at = ?
         where id = ? and status = 'ACTIVE'`,
        [`non-payment: billing record ${row.id} failed after ${attempts} attempts`, true, at, Number(row.user_id)],
        'run',
      );
      if (suspended.affectedRows === 1) counts.usersSuspended++;
    }
    if (paid.length > 0) {
      // Users suspended for non-payment with nothing unpaid left are active again (as after each charge in `attempt`).
      const paidUsers = [...new Set(paid.map((r) => Number(r.user_id)))];
      await sql.run(
        `update users set status = 'ACTIVE', suspension_reason = '', suspended_for_non_payment = ?, updated_at = ?
         where id in (${paidUsers.map(() => '?').join(', ')}) and status = 'SUSPENDED' and suspended_for_non_payment = ?
           and not exists (select 1 from billing_records b where b.user_id = users.id and b.status <> 'PAID')`,
        [false, at, ...paidUsers, true],
      );
    }
    counts.chargesSucceeded = paid.length;
    counts.retriesScheduled = scheduled.length;
    counts.recordsFailed = failed.length;
    outcomes.CHARGED = paid.map((r) => Number(r.id));
    outcomes.RETRY_SCHEDULED = scheduled.map(({ row }) => Number(row.id));
    outcomes.FAILED = failed.map((r) => Number(r.id));
    return { counts, outcomes, retryAt: retryAt === null ? null : new Date(retryAt) };
  }

  return {
    async createManualRecord(em, input) {
      if (input.amount <= 0n) throw invalidArgument('amount', 'NON_POSITIVE_AMOUNT', 'amount must be greater than zero');
      const description = input.description.trim();
      if (description === '') throw invalidArgument('description', 'MISSING_DESCRIPTION', 'description is required');
      if (description.length > MAX_DESCRIPTION) {
        throw invalidArgument('description', 'INVALID_DESCRIPTION', `description must be at most ${MAX_DESCRIPTION} characters`);
      }
      const requestId = checkRequestId(input.requestId);
      const hash = requestHash({ userId: input.userId, amount: input.amount, description });
      const { id, replayed } = await em.transactional(async (tx) => {
        if (requestId) {
          const existing = await findIdempotent(tx, 'CreateBillingRecord', requestId, hash);
          if (existing !== null) return { id: existing, replayed: true };
        }
        await getLiveUser(tx, input.userId);
        await holdOpenWallet(tx, input.userId);
        const now = clock.now();
        // Due at once: if the process dies before the first attempt, the retry scheduler makes it.
        const rows = await tx.execute<{ id: number | string }[]>(
          `insert into billing_records (user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, created_at, updated_at)
           values (?, 'MANUAL', cast(? as bigint), 'PENDING', ?, 0, ?, '', ?, ?) returning id`,
          [input.userId, input.amount.toString(), description, now.getTime(), now.getTime(), now.getTime()],
          'all',
        );
        const recordId = Number(rows[0].id);
        if (requestId) await saveIdempotent(tx, 'CreateBillingRecord', requestId, hash, recordId, now);
        return { id: recordId, replayed: false };
      });
      if (replayed) {
        const v = await view(em, id);
        return { ...v, outcome: outcomeOf(v.record.status), userSuspended: false };
      }
      return chargeAndView(em, id, 'new');
    },

    getRecord: (em, id) => view(em, id),

    async listRecords(em, filter, pageReq) {
      const page = readPage(pageReq, filter);
      const records = await em.find(
        BillingRecord,
        {
          id: { $gt: page.afterId },
          ...(filter.userId !== null ? { userId: filter.userId } : {}),
          ...(filter.status !== null ? { status: filter.status } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      const { items, nextPageToken } = pageOf(records, page);
      const lines = items.length
        ? await em.find(LineItem, { billingRecordId: { $in: items.map((r) => r.id) } }, { orderBy: { id: 'asc' } })
        : [];
      const byRecord = new Map<number, LineItem[]>();
      for (const line of lines) {
        const list = byRecord.get(line.billingRecordId) ?? [];
        list.push(line);
        byRecord.set(line.billingRecordId, list);
      }
      return { items: items.map((record) => ({ record, lineItems: byRecord.get(record.id) ?? [] })), nextPageToken };
    },

    async processRecord(em, id) {
      // PAID is final: answer it from a read, without a write transaction.
      const v = await view(em, id);
      if (v.record.status === 'PAID') return { ...v, outcome: 'ALREADY_PAID', userSuspended: false };
      return chargeAndView(em, id, 'manual');
    },

    async listUsageLogs(em, filter, pageReq) {
      const page = readPage(pageReq, filter);
      const rows = await em.find(
        UsageLog,
        {
          id: { $gt: page.afterId },
          ...(filter.userId !== null ? { userId: filter.userId } : {}),
          ...(filter.status !== null ? { status: filter.status } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },

    async settleUser(em, userId) {
      const rows = await rawRead<{ id: number | string }>(
        em,
        `select id from billing_records where user_id = ? and status <> 'PAID' order by id`,
        [userId],
      );
      const counts = emptyRetryCounts();
      const paidRecordIds: number[] = [];
      for (const { id } of rows) {
        const result = await charge(em, Number(id), 'settle');
        tally(counts, result);
        if (result.outcome === 'CHARGED') paidRecordIds.push(Number(id));
      }
      // A user suspended for non-payment with nothing unpaid (e.g. settled elsewhere) is reactivated too;
      // the write transaction is only needed when the user is suspended for non-payment at all.
      const suspended = await rawRead<{ id: number | string }>(
        em,
        `select id from users where id = ? and status = 'SUSPENDED' and suspended_for_non_payment = ?`,
        [userId, true],
      );
      if (suspended.length > 0) await em.transactional((tx) => reactivateIfSettled(tx, userId, clock.now()));
      return { counts, paidRecordIds };
    },

    async settleSweep(em) {
      const counts = emptyRetryCounts();
      const users = await em.execute<{ user_id: number | string }[]>(settleableUsersSql(SWEEP_USERS));
      for (const { user_id } of users) {
        const done = (await this.settleUser(em, Number(user_id))).counts;
        for (const k of Object.keys(done) as (keyof RetryCounts)[]) counts[k] += done[k];
      }
      if (counts.chargesSucceeded > 0) log.info({ users: users.length, ...counts }, 'settlement sweep');
      return counts;
    },

    async hasSettleable(em) {
      return (await rawRead(em, settleableUsersSql(1), [])).length > 0;
    },

    chargeNewRecords: (em, ids) => chargeBatched(em, ids, 'new'),

    async processDueRetries(em) {
      const counts = emptyRetryCounts();
      const seen = new Set<number>();
      for (;;) {
        const now = clock.now().getTime();
        const due = await em.execute<{ id: number | string }[]>(
          `select id from billing_records where status = 'PENDING' and next_attempt_at <= ? order by next_attempt_at, id limit ${BATCH}`,
          [now],
        );
        const ids = due.map((r) => Number(r.id)).filter((id) => !seen.has(id));
        if (ids.length === 0) return counts;
        for (const id of ids) seen.add(id);
        const done = await chargeBatched(em, ids, 'retry');
        for (const k of Object.keys(done) as (keyof RetryCounts)[]) counts[k] += done[k];
      }
    },

    async nextDueTime(em) {
      const rows = await em.execute<{ at: number | string | null }[]>(
        `select min(next_attempt_at) as at from billing_records where status = 'PENDING'`,
      );
      const at = rows[0]?.at;
      return at === null || at === undefined ? null : epochMs(at);
    },
  };
}

/** Users a sweep settles at most per call. */
const SWEEP_USERS = 1000;

/**
 * Users with an unpaid record (already attempted: new records are charged by
 * whoever created them) that their open wallet can pay now. Normally AddFunds
 * settles at once; these are what a failed settlement, or a credit written
 * while the record was being created, left behind.
 */
const settleableUsersSql = (limit: number): string =>
  `select distinct r.user_id from billing_records r join wallets w on w.user_id = r.user_id
   where r.status <> 'PAID' and r.attempt_count > 0 and w.closed_at is null and w.balance >= r.amount
   order by r.user_id limit ${limit}`;

function outcomeOf(status: BillingRecordStatus): ChargeOutcome {
  return status === 'PAID' ? 'CHARGED' : status === 'FAILED' ? 'FAILED' : 'RETRY_SCHEDULED';
}
