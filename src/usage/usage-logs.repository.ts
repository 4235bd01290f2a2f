/**
 * The door of the `usage_logs` and `usage_runs` tables: ingested entries are
 * stored here, each once under its identity (unique dedup_key), and PENDING
 * entries are billed (linked to a record) or told why they wait. An ingestion
 * run stores its rows over several transactions; `usage_runs` says whether it
 * sealed them, so that the rows of a run that never did can be rolled back.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Tx } from '../db/database';
import { int64 } from '../db/types';
import { pageOf, type Page } from '../shared/paging';
import { UsageLog, type UsageLogStatus } from './usage-log.entity';

/** A usage row as ingestion writes it, in its final state. */
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
  jobRunId: number;
  ingestedAt: number;
}

/** An earlier PENDING entry a run may bill now. */
export interface PendingUsage {
  id: number;
  userId: number;
  service: string;
  quantity: bigint;
}

/** A run that stored rows and never sealed them (it died, or its file turned out unusable). */
export interface UnsealedRun {
  jobRunId: number;
  /** Every row of the run has an id at least this. */
  firstUsageId: number;
}

export interface UsageLogsRepository {
  /** Records that `jobRunId` starts storing rows (state STAGING). */
  beginRun(tx: Tx, jobRunId: number): Promise<void>;
  /** Marks the run's rows final (in the transaction that seals its records). */
  sealRun(tx: Tx, jobRunId: number): Promise<void>;
  /** Runs other than `except` still STAGING. */
  unsealedRuns(tx: Tx, except: number): Promise<UnsealedRun[]>;
  /**
   * Deletes up to `limit` rows of an unsealed run; returns how many (0: none
   * left, and the run is then marked ROLLED_BACK).
   */
  rollBackSome(tx: Tx, run: UnsealedRun, limit: number): Promise<number>;
  /** Which of `keys` are stored, with the run that stored each. */
  storedKeys(tx: Tx, keys: readonly string[]): Promise<Map<string, number>>;
  /** Inserts rows (with the fewest prepared multi-row statements); throws if any was not inserted. */
  insert(tx: Tx, rows: readonly UsageRowDraft[]): Promise<void>;
  /** PENDING entries of live users and priced services, in id order after `afterId`. */
  billablePending(tx: Tx, pricedServices: readonly string[], afterId: number, limit: number): Promise<PendingUsage[]>;
  /** Bills PENDING entries of a user by linking them to the record; returns how many it linked. */
  linkToRecord(tx: Tx, userId: number, recordId: number, ids: readonly number[]): Promise<number>;
  /**
   * Says why each PENDING entry of earlier runs is not billed (UNKNOWN_USER,
   * USER_DELETED, NO_PRICE, else `overLimit`); returns how many are PENDING.
   */
  explainPending(tx: Tx, jobRunId: number, pricedServices: readonly string[], overLimit: string): Promise<number>;
  list(
    em: EntityManager,
    filter: { userId: number | null; status: UsageLogStatus | null },
    page: Page,
  ): Promise<{ items: UsageLog[]; nextPageToken: string }>;
}

const COLUMNS = ['dedup_key', 'user_id', 'service', 'quantity', 'usage_at', 'status', 'reason', 'billing_record_id', 'job_run_id', 'ingested_at'];
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
const PROBE_SQL = `select dedup_key, job_run_id from usage_logs where dedup_key in (${Array.from({ length: PROBE_KEYS }, () => '?').join(', ')})`;

const placeholders = (n: number): string => Array.from({ length: n }, () => '?').join(', ');

export function createUsageLogsRepository(): UsageLogsRepository {
  return {
    async beginRun(tx, jobRunId) {
      await tx.run(
        `insert into usage_runs (job_run_id, first_usage_id, state) values (?, (select coalesce(max(id), 0) + 1 from usage_logs), 'STAGING')`,
        [jobRunId],
      );
    },

    async sealRun(tx, jobRunId) {
      const changed = await tx.run(`update usage_runs set state = 'SEALED' where job_run_id = ? and state = 'STAGING'`, [jobRunId]);
      if (changed !== 1) throw new Error(`ingestion run ${jobRunId} was rolled back while it ran`);
    },

    async unsealedRuns(tx, except) {
      const rows = await tx.all<{ job_run_id: number | string; first_usage_id: number | string }>(
        `select job_run_id, first_usage_id from usage_runs where state = 'STAGING' and job_run_id <> ? order by job_run_id`,
        [except],
      );
      return rows.map((r) => ({ jobRunId: Number(r.job_run_id), firstUsageId: Number(r.first_usage_id) }));
    },

    async rollBackSome(tx, run, limit) {
      const deleted = await tx.run(
        `delete from usage_logs where id in (select id from usage_logs where id >= ? and job_run_id = ? order by id limit ?)`,
        [run.firstUsageId, run.jobRunId, limit],
      );
      if (deleted === 0) await tx.run(`update usage_runs set state = 'ROLLED_BACK' where job_run_id = ?`, [run.jobRunId]);
      return deleted;
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

    async insert(tx, rows) {
      const params = rows.flatMap((r) => [
        r.dedupKey,
        r.userId,
        r.service,
        r.quantity,
        r.usageAt,
        r.status,
        r.reason,
        r.billingRecordId,
        r.jobRunId,
        r.ingestedAt,
      ]);
      const width = COLUMNS.length;
      let at = 0;
      for (const size of INSERT_SIZES) {
        while (rows.length - at >= size) {
          const changed = await tx.run(INSERT_SQL.get(size)!, params.slice(at * width, (at + size) * width), { keep: true });
          if (changed !== size) throw new Error('usage rows changed while ingesting; run aborted');
          at += size;
        }
      }
    },

    async billablePending(tx, pricedServices, afterId, limit) {
      if (pricedServices.length === 0) return [];
      const rows = await tx.all<{ id: number | string; user_id: number | string; service: string; quantity: string }>(
        `select l.id, l.user_id, l.service, cast(l.quantity as text) as quantity
         from usage_logs l
         where l.id > ? and l.status = 'PENDING' and l.service in (${placeholders(pricedServices.length)})
           and exists (select 1 from users u where u.id = l.user_id and u.deleted_at is null)
         order by l.id limit ?`,
        [afterId, ...pricedServices, limit],
      );
      return rows.map((r) => ({ id: Number(r.id), userId: Number(r.user_id), service: r.service, quantity: int64(r.quantity) }));
    },

    async linkToRecord(tx, userId, recordId, ids) {
      let linked = 0;
      for (let i = 0; i < ids.length; i += 500) {
        const part = ids.slice(i, i + 500);
        linked += await tx.run(
          `update usage_logs set status = 'BILLED', reason = '', billing_record_id = ?
           where user_id = ? and status = 'PENDING' and id in (${placeholders(part.length)})`,
          [recordId, userId, ...part],
        );
      }
      return linked;
    },

    async explainPending(tx, jobRunId, pricedServices, overLimit) {
      const priced = pricedServices.length === 0 ? `''` : placeholders(pricedServices.length);
      await tx.run(
        `update usage_logs set reason = case
           when not exists (select 1 from users u where u.id = usage_logs.user_id) then 'UNKNOWN_USER'
           when exists (select 1 from users u where u.id = usage_logs.user_id and u.deleted_at is not null) then 'USER_DELETED'
           when usage_logs.service not in (${priced}) then 'NO_PRICE'
           else ? end
         where status = 'PENDING' and (job_run_id is null or job_run_id <> ?)`,
        [...pricedServices, overLimit, jobRunId],
      );
      const [{ n }] = await tx.all<{ n: number | string }>(`select count(*) as n from usage_logs where status = 'PENDING'`, []);
      return Number(n);
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
          ...(unsealed.length > 0 ? { $or: [{ jobRunId: null }, { jobRunId: { $nin: unsealed } }] } : {}),
        },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },
  };
}
