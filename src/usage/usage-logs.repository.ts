/**
 * The door of the `usage_logs`, `usage_runs` and `usage_pending_totals`
 * tables: usage entries are stored here, each once under its identity (unique
 * dedup_key), and PENDING entries are billed (linked to a record) or told why
 * they wait. An ingestion run stores its rows over several transactions;
 * `usage_runs` says how far it got: STAGING (storing; a run that dies so is
 * rolled back), SEALING (decided: its records are being made visible, and a
 * run that dies so is finished by the next), SEALED, or ROLLED_BACK. `usage_pending_totals` holds, per user and
 * service, the total of the PENDING usage of live users; every method here
 * that adds, bills or deletes PENDING rows moves it in the same transaction.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Database, Read, Tx } from '../db/database';
import { int64 } from '../db/types';
import { pageOf, type Page } from '../shared/paging';
import { UsageLog, type UsageLogStatus, type UsageSource } from './usage-log.entity';

/** A usage row as it is stored, in its final state. */
export interface UsageRowDraft {
  dedupKey: string;
  /** null: rejected. */
  userId: number | null;
  service: string;
  /** Exact decimal text of the quantity scaled by 10^6. */
  quantity: string;
  usageAt: number | null;
  status: UsageLogStatus;
  reason: string;
  billingRecordId: number | null;
  jobRunId: number | null;
  ingestedAt: number;
  source: UsageSource;
}

/** An earlier PENDING entry a run may bill now. */
export interface PendingUsage {
  id: number;
  userId: number;
  service: string;
  quantity: bigint;
}

/** What is stored under a producer's event id (`e:<id>`). */
export interface StoredEvent {
  id: number;
  userId: number | null;
  service: string;
  quantity: bigint;
  usageAt: number | null;
  /** The ingestion run that stored it and is still STAGING (not decided: its rows may still be rolled back), else null. */
  unsealedRun: number | null;
}

/**
 * A run that stored rows and never sealed them all: STAGING (it died, or its
 * file turned out unusable: rolled back) or SEALING (it died sealing: finished).
 */
export interface UnsealedRun {
  jobRunId: number;
  state: 'STAGING' | 'SEALING';
  /** Every row of the run has an id at least this. */
  firstUsageId: number;
}

/** One row of a usage summary: a service's usage in a period. */
export interface UsageSummaryRow {
  service: string;
  /** The period's start (epoch ms); with no period, the summary's start. */
  periodStart: number;
  quantity: bigint;
  entries: number;
}

export interface UsageFilter {
  userId: number | null;
  status: UsageLogStatus | null;
  source: UsageSource | null;
  /** Usage time range, [from, to). */
  from: Date | null;
  to: Date | null;
}

export interface UsageLogsRepository {
  /** Records that `jobRunId` starts storing rows (state STAGING). */
  beginRun(tx: Tx, jobRunId: number): Promise<void>;
  /** The run has read its file and prepared its records: it is decided, and seals them from now on (SEALING). */
  beginSealing(tx: Tx, jobRunId: number): Promise<void>;
  /** Marks the run's rows final (SEALING -> SEALED, in the transaction that seals its last records). */
  sealRun(tx: Tx, jobRunId: number): Promise<void>;
  /** Runs other than `except` still STAGING or SEALING, oldest first. */
  unsealedRuns(tx: Tx, except: number): Promise<UnsealedRun[]>;
  /**
   * Deletes up to `limit` rows of a STAGING run; returns how many (0: none
   * left, and the run is then marked ROLLED_BACK).
   */
  rollBackSome(tx: Tx, run: UnsealedRun, limit: number): Promise<number>;
  /** True while the ingestion run `jobRunId` is STAGING: its rows may still be rolled back (committed read). */
  runIsOpen(jobRunId: number): Promise<boolean>;
  /** Which of `keys` are stored, with the run that stored each. */
  storedKeys(tx: Tx, keys: readonly string[]): Promise<Map<string, number>>;
  /** The entries stored under these producer event ids (keys `e:<id>`), by event id. */
  storedEvents(tx: Tx, eventIds: readonly string[]): Promise<Map<string, StoredEvent>>;
  /**
   * Inserts rows (with the fewest prepared multi-row statements); throws if
   * any was not inserted. PENDING rows of live users (any reason but
   * UNKNOWN_USER and USER_DELETED) join the pending totals. No ids come back:
   * an ingestion's million rows would each be read back for nothing.
   */
  insert(tx: Tx, rows: readonly UsageRowDraft[]): Promise<void>;
  /**
   * Stores producer events (rows with `e:<id>` keys) unless their key is
   * stored already, by this or a concurrent writer (on PostgreSQL an insert
   * meeting another transaction's uncommitted row waits for it, so a key is
   * never stored twice and never lost): returns the new rows' ids by key.
   * Only the new rows join the pending totals. Rows are inserted in key order,
   * so that two writers of overlapping keys never wait for each other in a
   * circle.
   */
  insertEvents(tx: Tx, rows: readonly UsageRowDraft[]): Promise<Map<string, number>>;
  /** PENDING entries of live users and priced services, in id order after `afterId`. */
  billablePending(tx: Tx, pricedServices: readonly string[], afterId: number, limit: number): Promise<PendingUsage[]>;
  /** Bills PENDING entries of a user by linking them to the record (and out of the pending totals); returns how many. */
  linkToRecord(tx: Tx, userId: number, recordId: number, entries: readonly PendingUsage[]): Promise<number>;
  /**
   * Says why each PENDING entry of earlier runs is not billed: UNKNOWN_USER,
   * USER_DELETED, NO_PRICE, else (billable: the next run bills it) no reason,
   * or `overLimit` for the ids in `overLimitIds`. Returns how many are PENDING.
   */
  explainPending(tx: Tx, jobRunId: number, pricedServices: readonly string[], overLimit: string, overLimitIds: readonly number[]): Promise<number>;
  /** A user was created: their PENDING usage (recorded for an unknown user) joins the pending totals. */
  countPendingOf(tx: Tx, userId: number): Promise<void>;
  /** A user is being deleted: their PENDING usage leaves the pending totals. */
  forgetPendingOf(tx: Tx, userId: number): Promise<void>;
  /** The pending totals of a user, by service (committed read, or through `read`: a snapshot, a transaction). */
  pendingTotals(userId: number, read?: Read): Promise<Map<string, bigint>>;
  /** pendingTotals of each of `userIds` in `tx` (an empty map for a user with none). */
  pendingTotalsOf(tx: Tx, userIds: readonly number[]): Promise<Map<number, Map<string, bigint>>>;
  /** Billed and PENDING usage between `from` and `to`, per service and (when `periodMs`) per period. */
  summary(filter: { userId: number | null; service: string | null; from: Date; to: Date; periodMs: number | null }): Promise<UsageSummaryRow[]>;
  list(em: EntityManager, filter: UsageFilter, page: Page): Promise<{ items: UsageLog[]; nextPageToken: string }>;
}

const TWO_32 = 4294967296n;
/** The columns of PENDING_COLUMNS; a left join leaves them null. */
export type PendingColumns = { service: string | null; hi: string | null; lo: string | null };
/** One row per service of a user's pending totals, from `usage_pending_totals p`: service, hi, lo (32-bit halves). */
const PENDING_COLUMNS = 'p.service, cast(p.quantity_hi as text) as hi, cast(p.quantity_lo as text) as lo';
/**
 * A user's pending totals as rows of another table's read, in the same
 * statement (one snapshot: GetBalance, ledger.readWithOwed): a left join on
 * the SQL `userId` (a placeholder or a column) and its columns, read back with
 * pendingOf.
 */
export const pendingTotalsJoin = (userId: string): { columns: string; join: string } => ({
  columns: PENDING_COLUMNS,
  join: `left join usage_pending_totals p on p.user_id = ${userId}`,
});
/** The pending quantity per service of rows with PENDING_COLUMNS (services at zero left out). */
export function pendingOf(rows: readonly PendingColumns[]): Map<string, bigint> {
  const totals = new Map<string, bigint>();
  for (const r of rows) {
    if (r.service === null || r.hi === null || r.lo === null) continue;
    const quantity = BigInt(r.hi) * TWO_32 + BigInt(r.lo);
    if (quantity !== 0n) totals.set(r.service, quantity);
  }
  return totals;
}

/** One (user, service) change of the pending totals. */
type TotalsDelta = { quantity: bigint; entries: number };
const totalKey = (userId: number, service: string) => `${userId}\u0000${service}`;

const COLUMNS = ['dedup_key', 'user_id', 'service', 'quantity', 'usage_at', 'status', 'reason', 'billing_record_id', 'job_run_id', 'ingested_at', 'source'];
/** Rows per multi-row INSERT statement; smaller statements take the remainder. */
const INSERT_SIZES = [500, 100, 10, 1];
const INSERT_SQL = new Map(
  INSERT_SIZES.map((size) => [
    size,
    `insert into usage_logs (${COLUMNS.join(', ')}) values ${Array.from({ length: size }, () => `(${COLUMNS.map(() => '?').join(', ')})`).join(', ')}`,
  ]),
);
/** Keys per look-up (one kept statement: a shorter list is padded). */
export const PROBE_KEYS = 500;
const PROBE_LIST = Array.from({ length: PROBE_KEYS }, () => '?').join(', ');
const PROBE_SQL = `select dedup_key, job_run_id from usage_logs where dedup_key in (${PROBE_LIST})`;
const EVENTS_SQL =
  `select l.id, l.dedup_key, l.user_id, l.service, cast(l.quantity as text) as quantity, l.usage_at, r.job_run_id as unsealed_run ` +
  `from usage_logs l left join usage_runs r on r.job_run_id = l.job_run_id and r.state = 'STAGING' where l.dedup_key in (${PROBE_LIST})`;

const EVENT_INSERT_SQL = new Map(
  INSERT_SIZES.map((size) => [
    size,
    `insert into usage_logs (${COLUMNS.join(', ')}) values ${Array.from({ length: size }, () => `(${COLUMNS.map(() => '?').join(', ')})`).join(', ')} ` +
      `on conflict (dedup_key) do nothing returning id, dedup_key`,
  ]),
);

/** The parameters of rows[at, at + n), in COLUMNS order, as one flat list (a multi-row statement's). */
function paramsOf(rows: readonly UsageRowDraft[], at: number, n: number): unknown[] {
  const params: unknown[] = new Array(n * COLUMNS.length);
  let k = 0;
  for (let i = at; i < at + n; i++) {
    const r = rows[i];
    params[k++] = r.dedupKey;
    params[k++] = r.userId;
    params[k++] = r.service;
    params[k++] = r.quantity;
    params[k++] = r.usageAt;
    params[k++] = r.status;
    params[k++] = r.reason;
    params[k++] = r.billingRecordId;
    params[k++] = r.jobRunId;
    params[k++] = r.ingestedAt;
    params[k++] = r.source;
  }
  return params;
}

/** PENDING usage of a live user (any reason but UNKNOWN_USER and USER_DELETED) is in the pending totals. */
const counted = (r: UsageRowDraft): boolean =>
  r.status === 'PENDING' && r.userId !== null && r.reason !== 'UNKNOWN_USER' && r.reason !== 'USER_DELETED';

const placeholders = (n: number): string => Array.from({ length: n }, () => '?').join(', ');

export function createUsageLogsRepository(db: Database): UsageLogsRepository {
  /** Adds (or, negative, takes) quantities to the pending totals: one set-based upsert. */
  async function moveTotals(tx: Tx, deltas: ReadonlyMap<string, TotalsDelta & { userId: number; service: string }>): Promise<void> {
    // In (user, service) order: two writers of the same totals never wait for each other in a circle (PostgreSQL).
    const list = [...deltas.values()]
      .filter((d) => d.entries !== 0 || d.quantity !== 0n)
      .sort((a, b) => a.userId - b.userId || (a.service < b.service ? -1 : a.service > b.service ? 1 : 0));
    for (let i = 0; i < list.length; i += 500) {
      const part = list.slice(i, i + 500);
      await tx.run(
        `insert into usage_pending_totals (user_id, service, quantity_hi, quantity_lo, entries)
         values ${part.map(() => '(?, ?, cast(? as bigint), cast(? as bigint), ?)').join(', ')}
         on conflict (user_id, service) do update set quantity_hi = usage_pending_totals.quantity_hi + excluded.quantity_hi,
           quantity_lo = usage_pending_totals.quantity_lo + excluded.quantity_lo, entries = usage_pending_totals.entries + excluded.entries`,
        part.flatMap((d) => [d.userId, d.service, (d.quantity / TWO_32).toString(), (d.quantity % TWO_32).toString(), d.entries]),
      );
    }
  }

  function addDelta(deltas: Map<string, TotalsDelta & { userId: number; service: string }>, userId: number, service: string, quantity: bigint, entries: number) {
    const key = totalKey(userId, service);
    const d = deltas.get(key);
    if (d) {
      d.quantity += quantity;
      d.entries += entries;
    } else {
      deltas.set(key, { userId, service, quantity, entries });
    }
  }

  const TOTALS_SQL = `select ${PENDING_COLUMNS} from usage_pending_totals p where p.user_id = ?`;

  return {
    async beginRun(tx, jobRunId) {
      await tx.run(
        `insert into usage_runs (job_run_id, first_usage_id, state) values (?, (select coalesce(max(id), 0) + 1 from usage_logs), 'STAGING')`,
        [jobRunId],
      );
    },

    async beginSealing(tx, jobRunId) {
      const changed = await tx.run(`update usage_runs set state = 'SEALING' where job_run_id = ? and state = 'STAGING'`, [jobRunId]);
      if (changed !== 1) throw new Error(`ingestion run ${jobRunId} was rolled back while it ran`);
    },

    async sealRun(tx, jobRunId) {
      const changed = await tx.run(`update usage_runs set state = 'SEALED' where job_run_id = ? and state = 'SEALING'`, [jobRunId]);
      if (changed !== 1) throw new Error(`ingestion run ${jobRunId} is not sealing`);
    },

    async unsealedRuns(tx, except) {
      const rows = await tx.all<{ job_run_id: number | string; first_usage_id: number | string; state: UnsealedRun['state'] }>(
        `select job_run_id, first_usage_id, state from usage_runs where state in ('STAGING', 'SEALING') and job_run_id <> ? order by job_run_id`,
        [except],
      );
      return rows.map((r) => ({ jobRunId: Number(r.job_run_id), firstUsageId: Number(r.first_usage_id), state: r.state }));
    },

    async rollBackSome(tx, run, limit) {
      if (run.state !== 'STAGING') throw new Error(`ingestion run ${run.jobRunId} is ${run.state}: it is finished, not rolled back`);
      const rows = await tx.all<{ id: number | string; user_id: number | string | null; service: string; quantity: string; counted: number | boolean }>(
        `select l.id, l.user_id, l.service, cast(l.quantity as text) as quantity,
                (l.status = 'PENDING' and exists (select 1 from wallets w where w.user_id = l.user_id and w.closed_at is null)) as counted
         from usage_logs l where l.id >= ? and l.job_run_id = ? order by l.id limit ?`,
        [run.firstUsageId, run.jobRunId, limit],
      );
      if (rows.length === 0) {
        await tx.run(`update usage_runs set state = 'ROLLED_BACK' where job_run_id = ? and state = 'STAGING'`, [run.jobRunId]);
        return 0;
      }
      const deltas = new Map<string, TotalsDelta & { userId: number; service: string }>();
      for (const r of rows) if (r.counted === true || r.counted === 1) addDelta(deltas, Number(r.user_id), r.service, -int64(r.quantity), -1);
      await moveTotals(tx, deltas);
      for (let i = 0; i < rows.length; i += 500) {
        const part = rows.slice(i, i + 500);
        await tx.run(`delete from usage_logs where id in (${part.map(() => '?').join(', ')})`, part.map((r) => Number(r.id)));
      }
      return rows.length;
    },

    async runIsOpen(jobRunId) {
      const rows = await db.read<{ state: string }>(`select state from usage_runs where job_run_id = ?`, [jobRunId]);
      return rows.length > 0 && rows[0].state === 'STAGING';
    },

    async storedKeys(tx, keys) {
      const stored = new Map<string, number>();
      for (let i = 0; i < keys.length; i += PROBE_KEYS) {
        const part = keys.slice(i, i + PROBE_KEYS);
        while (part.length < PROBE_KEYS) part.push(part[0]);
        const rows = await tx.all<{ dedup_key: string; job_run_id: number | string | null }>(PROBE_SQL, part, { keep: true });
        for (const r of rows) stored.set(r.dedup_key, Number(r.job_run_id));
      }
      return stored;
    },

    async storedEvents(tx, eventIds) {
      const stored = new Map<string, StoredEvent>();
      for (let i = 0; i < eventIds.length; i += PROBE_KEYS) {
        const part = eventIds.slice(i, i + PROBE_KEYS).map((id) => `e:${id}`);
        while (part.length < PROBE_KEYS) part.push(part[0]);
        const rows = await tx.all<{
          id: number | string;
          dedup_key: string;
          user_id: number | string | null;
          service: string;
          quantity: string;
          usage_at: number | string | null;
          unsealed_run: number | string | null;
        }>(
          EVENTS_SQL,
          part,
          { keep: true },
        );
        for (const r of rows) {
          stored.set(r.dedup_key.slice(2), {
            id: Number(r.id),
            userId: r.user_id === null ? null : Number(r.user_id),
            service: r.service,
            quantity: int64(r.quantity),
            usageAt: r.usage_at === null ? null : Number(r.usage_at),
            unsealedRun: r.unsealed_run === null ? null : Number(r.unsealed_run),
          });
        }
      }
      return stored;
    },

    async insert(tx, rows) {
      let at = 0;
      for (const size of INSERT_SIZES) {
        while (rows.length - at >= size) {
          const inserted = await tx.run(INSERT_SQL.get(size)!, paramsOf(rows, at, size), { keep: true });
          if (inserted !== size) throw new Error('usage rows changed while storing them; aborted');
          at += size;
        }
      }
      const deltas = new Map<string, TotalsDelta & { userId: number; service: string }>();
      for (const r of rows) if (counted(r)) addDelta(deltas, r.userId!, r.service, BigInt(r.quantity), 1);
      await moveTotals(tx, deltas);
    },

    async insertEvents(tx, rows) {
      const sorted = [...rows].sort((a, b) => (a.dedupKey < b.dedupKey ? -1 : a.dedupKey > b.dedupKey ? 1 : 0));
      const ids = new Map<string, number>();
      let at = 0;
      for (const size of INSERT_SIZES) {
        while (sorted.length - at >= size) {
          const inserted = await tx.all<{ id: number | string; dedup_key: string }>(EVENT_INSERT_SQL.get(size)!, paramsOf(sorted, at, size), { keep: true });
          for (const r of inserted) ids.set(r.dedup_key, Number(r.id));
          at += size;
        }
      }
      const deltas = new Map<string, TotalsDelta & { userId: number; service: string }>();
      for (const r of sorted) if (ids.has(r.dedupKey) && counted(r)) addDelta(deltas, r.userId!, r.service, BigInt(r.quantity), 1);
      await moveTotals(tx, deltas);
      return ids;
    },

    async billablePending(tx, pricedServices, afterId, limit) {
      if (pricedServices.length === 0) return [];
      const rows = await tx.all<{ id: number | string; user_id: number | string; service: string; quantity: string }>(
        `select l.id, l.user_id, l.service, cast(l.quantity as text) as quantity
         from usage_logs l
         where l.id > ? and l.status = 'PENDING' and l.service in (${placeholders(pricedServices.length)})
           and exists (select 1 from wallets w where w.user_id = l.user_id and w.closed_at is null)
         order by l.id limit ?`,
        [afterId, ...pricedServices, limit],
      );
      return rows.map((r) => ({ id: Number(r.id), userId: Number(r.user_id), service: r.service, quantity: int64(r.quantity) }));
    },

    async linkToRecord(tx, userId, recordId, entries) {
      let linked = 0;
      for (let i = 0; i < entries.length; i += 500) {
        const part = entries.slice(i, i + 500);
        linked += await tx.run(
          `update usage_logs set status = 'BILLED', reason = '', billing_record_id = ?
           where user_id = ? and status = 'PENDING' and id in (${placeholders(part.length)})`,
          [recordId, userId, ...part.map((e) => e.id)],
        );
      }
      const deltas = new Map<string, TotalsDelta & { userId: number; service: string }>();
      for (const e of entries) addDelta(deltas, userId, e.service, -e.quantity, -1);
      await moveTotals(tx, deltas);
      return linked;
    },

    async explainPending(tx, jobRunId, pricedServices, overLimit, overLimitIds) {
      const priced = pricedServices.length === 0 ? `''` : placeholders(pricedServices.length);
      await tx.run(
        `update usage_logs set reason = case
           when not exists (select 1 from users u where u.id = usage_logs.user_id) then 'UNKNOWN_USER'
           when exists (select 1 from users u where u.id = usage_logs.user_id and u.deleted_at is not null) then 'USER_DELETED'
           when usage_logs.service not in (${priced}) then 'NO_PRICE'
           else '' end
         where status = 'PENDING' and (job_run_id is null or job_run_id <> ?)`,
        [...pricedServices, jobRunId],
      );
      for (let i = 0; i < overLimitIds.length; i += 500) {
        const part = overLimitIds.slice(i, i + 500);
        await tx.run(`update usage_logs set reason = ? where status = 'PENDING' and id in (${placeholders(part.length)})`, [overLimit, ...part]);
      }
      const [{ n }] = await tx.all<{ n: number | string }>(`select count(*) as n from usage_logs where status = 'PENDING'`, []);
      return Number(n);
    },

    async countPendingOf(tx, userId) {
      await tx.run(
        `insert into usage_pending_totals (user_id, service, quantity_hi, quantity_lo, entries)
         select user_id, service, sum(quantity / 4294967296), sum(quantity % 4294967296), count(*)
         from usage_logs where user_id = ? and status = 'PENDING' group by user_id, service
         on conflict (user_id, service) do update set quantity_hi = usage_pending_totals.quantity_hi + excluded.quantity_hi,
           quantity_lo = usage_pending_totals.quantity_lo + excluded.quantity_lo, entries = usage_pending_totals.entries + excluded.entries`,
        [userId],
      );
    },

    async forgetPendingOf(tx, userId) {
      await tx.run('delete from usage_pending_totals where user_id = ?', [userId]);
    },

    async pendingTotals(userId, read = (sql, params) => db.read(sql, params)) {
      return pendingOf(await read<PendingColumns>(TOTALS_SQL, [userId]));
    },

    async pendingTotalsOf(tx, userIds) {
      const totals = new Map<number, Map<string, bigint>>(userIds.map((id) => [id, new Map()]));
      for (let i = 0; i < userIds.length; i += 500) {
        const part = userIds.slice(i, i + 500);
        const rows = await tx.all<{ user_id: number | string; service: string; hi: string; lo: string }>(
          `select user_id, service, cast(quantity_hi as text) as hi, cast(quantity_lo as text) as lo
           from usage_pending_totals where user_id in (${placeholders(part.length)})`,
          part,
          { keep: part.length === 1 },
        );
        for (const r of rows) {
          const quantity = BigInt(r.hi) * TWO_32 + BigInt(r.lo);
          if (quantity !== 0n) totals.get(Number(r.user_id))?.set(r.service, quantity);
        }
      }
      return totals;
    },

    async summary({ userId, service, from, to, periodMs }) {
      const bucket = periodMs === null ? `${from.getTime()}` : `(l.usage_at / ${periodMs}) * ${periodMs}`;
      const rows = await db.read<{ service: string; period: number | string; n: number | string; hi: string; lo: string }>(
        `select l.service, ${bucket} as period, count(*) as n,
                cast(sum(l.quantity / 4294967296) as text) as hi, cast(sum(l.quantity % 4294967296) as text) as lo
         from usage_logs l
         where l.usage_at >= ? and l.usage_at < ? and l.status in ('BILLED', 'PENDING')
           ${userId === null ? '' : 'and l.user_id = ?'} ${service === null ? '' : 'and l.service = ?'}
           and not exists (select 1 from usage_runs r where r.job_run_id = l.job_run_id and r.state <> 'SEALED')
         group by l.service, period order by l.service, period`,
        [from.getTime(), to.getTime(), ...(userId === null ? [] : [userId]), ...(service === null ? [] : [service])],
      );
      return rows.map((r) => ({ service: r.service, periodStart: Number(r.period), quantity: BigInt(r.hi) * TWO_32 + BigInt(r.lo), entries: Number(r.n) }));
    },

    async list(em, filter, page) {
      // The rows of a run appear together, when it seals them (the runs still storing theirs are few).
      const unsealed = (await em.execute<{ job_run_id: number | string }[]>(`select job_run_id from usage_runs where state <> 'SEALED'`)).map((r) =>
        Number(r.job_run_id),
      );
      const rows = await em.find(
        UsageLog,
        {
          id: { $gt: page.afterId },
          ...(filter.userId !== null ? { userId: filter.userId } : {}),
          ...(filter.status !== null ? { status: filter.status } : {}),
          ...(filter.source !== null ? { source: filter.source } : {}),
          ...(filter.from !== null || filter.to !== null
            ? { usageAt: { ...(filter.from !== null ? { $gte: filter.from } : {}), ...(filter.to !== null ? { $lt: filter.to } : {}) } }
            : {}),
          ...(unsealed.length > 0 ? { $or: [{ jobRunId: null }, { jobRunId: { $nin: unsealed } }] } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },
  };
}
