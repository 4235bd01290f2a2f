/**
 * Usage ingestion: the log file -> usage_logs -> one billing record per user
 * -> charges. The file is streamed in batches into a staging table inside one
 * transaction, so memory stays flat, a malformed JSON array bills nothing, and
 * a crash leaves either the whole run or none of it. See identity.ts for the
 * exactly-once rule.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import type { BillingService } from '../billing/billing.types';
import { isPostgres } from '../db/platform';
import { int64 } from '../db/types';
import type { Clock } from '../shared/clock';
import { formatDecimal, lineAmount, QUANTITY_SCALE } from '../shared/money';
import { rejectedIdentity, usageIdentity } from './identity';
import { readUsageFile, UsageFileError, type RawEntry } from './parser';
import { validateEntry } from './validate';

export interface IngestCounts {
  entriesRead: number;
  entriesAccepted: number;
  entriesDuplicate: number;
  entriesRejected: number;
  entriesPending: number;
  billingRecordsCreated: number;
  chargesSucceeded: number;
  retriesScheduled: number;
  recordsFailed: number;
  usersSuspended: number;
  /** A reported, non-fatal problem (e.g. the file is missing). */
  notice: string;
}

export interface IngestService {
  /** Ingests the file and bills what is billable; throws when the file is unusable (nothing is written then). */
  ingest(em: EntityManager, jobRunId: number): Promise<IngestCounts>;
}

export interface IngestDeps {
  clock: Clock;
  log: Logger;
  pricing: ReadonlyMap<string, bigint>;
  logFilePath: string;
  maxFutureSkewMs: number;
  billing: BillingService;
}

/** Rows per multi-row INSERT: 10 columns x 400 stays far below both databases' parameter limits. */
const INSERT_ROWS = 400;
const STAGING_COLUMNS = 10;

export class UsageFileUnusable extends Error {
  override readonly name = 'UsageFileUnusable';
}

export function createIngestService(deps: IngestDeps): IngestService {
  const { clock, log, pricing } = deps;
  const pricedServices = [...pricing.keys()];

  function stagingRow(jobRunId: number, entry: RawEntry, now: Date): unknown[] {
    const v = validateEntry(entry, now, deps.maxFutureSkewMs);
    if (v.ok) {
      const { kind, identity } = usageIdentity(v.usage);
      const u = v.usage;
      return [jobRunId, entry.ordinal, kind, identity, u.userId, u.service, u.quantity.toString(), u.timestamp.getTime(), 'PENDING', ''];
    }
    const { kind, identity } = rejectedIdentity(entry.raw);
    return [jobRunId, entry.ordinal, kind, identity, null, '', '0', null, 'REJECTED', v.reason];
  }

  async function stage(tx: EntityManager, jobRunId: number, rows: unknown[][]): Promise<void> {
    for (let i = 0; i < rows.length; i += INSERT_ROWS) {
      const chunk = rows.slice(i, i + INSERT_ROWS);
      const values = chunk.map(() => '(?, ?, ?, ?, ?, ?, cast(? as bigint), ?, ?, ?)').join(', ');
      await tx.execute(
        `insert into usage_staging (job_run_id, ordinal, identity_kind, identity, user_id, service, quantity, usage_at, status, reason) values ${values}`,
        chunk.flat(),
        'run',
      );
    }
  }

  /** Staging -> usage_logs; an identity already stored is a duplicate and is skipped. */
  async function promote(tx: EntityManager, jobRunId: number, now: Date): Promise<void> {
    await tx.execute(
      `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, job_run_id, ingested_at)
       select case when s.identity_kind = 'e' then 'e:' || s.identity
                   else s.identity_kind || ':' || s.identity || ':' ||
                        cast(row_number() over (partition by s.identity_kind, s.identity order by s.ordinal) as text) end,
              s.user_id, s.service, s.quantity, s.usage_at, s.status, s.reason, ?, ?
       from usage_staging s where s.job_run_id = ?
       order by s.ordinal
       on conflict (dedup_key) do nothing`,
      [jobRunId, now.getTime(), jobRunId],
      'run',
    );
    await tx.execute('delete from usage_staging where job_run_id = ?', [jobRunId], 'run');
  }

  /** SQL condition (on usage_logs `l`) and params: PENDING, live user, priced service. */
  function billable(): { sql: string; params: unknown[] } {
    if (pricedServices.length === 0) return { sql: '1 = 0', params: [] };
    return {
      sql: `l.status = 'PENDING' and l.service in (${pricedServices.map(() => '?').join(', ')})
            and exists (select 1 from users u where u.id = l.user_id and u.deleted_at is null)`,
      params: pricedServices,
    };
  }

  /** Bills every billable PENDING entry: one record per user, one line per service. Returns the new record ids. */
  async function bill(tx: EntityManager, jobRunId: number, now: Date): Promise<number[]> {
    const cond = billable();
    const groups = await tx.execute<{ user_id: number | string; service: string; quantity: string; n: number | string }[]>(
      `select l.user_id, l.service, cast(sum(l.quantity) as text) as quantity, count(*) as n
       from usage_logs l where ${cond.sql} group by l.user_id, l.service order by l.user_id, l.service`,
      cond.params,
    );
    const byUser = new Map<number, { service: string; quantity: bigint; n: number }[]>();
    for (const g of groups) {
      const userId = Number(g.user_id);
      const lines = byUser.get(userId) ?? [];
      lines.push({ service: g.service, quantity: int64(g.quantity), n: Number(g.n) });
      byUser.set(userId, lines);
    }
    const ids: number[] = [];
    for (const [userId, lines] of byUser) {
      const priced = lines.map((l) => {
        const unitPrice = pricing.get(l.service)!;
        return { ...l, unitPrice, amount: lineAmount(l.quantity, unitPrice) };
      });
      const total = priced.reduce((sum, l) => sum + l.amount, 0n);
      const description = `Usage: ${priced.map((l) => `${formatDecimal(l.quantity, QUANTITY_SCALE)} ${l.service}`).join(', ')} (job run ${jobRunId})`;
      const inserted = await tx.execute<{ id: number | string }[]>(
        `insert into billing_records (user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, job_run_id, created_at, updated_at)
         values (?, 'USAGE', cast(? as bigint), 'PENDING', ?, 0, ?, '', ?, ?, ?) returning id`,
        [userId, total.toString(), description, now.getTime(), jobRunId, now.getTime(), now.getTime()],
        'all',
      );
      const recordId = Number(inserted[0].id);
      await tx.execute(
        `insert into line_items (billing_record_id, service, quantity, unit_price, amount) values ${priced
          .map(() => '(?, ?, cast(? as bigint), cast(? as bigint), cast(? as bigint))')
          .join(', ')}`,
        priced.flatMap((l) => [recordId, l.service, l.quantity.toString(), l.unitPrice.toString(), l.amount.toString()]),
        'run',
      );
      const expected = priced.reduce((n, l) => n + l.n, 0);
      const linked = await tx.execute<{ affectedRows: number }>(
        `update usage_logs set status = 'BILLED', reason = '', billing_record_id = ? where user_id = ? and id in (
           select l.id from usage_logs l where l.user_id = ? and ${cond.sql})`,
        [recordId, userId, userId, ...cond.params],
        'run',
      );
      // Another writer billed some of these entries first: undo the whole run rather than bill twice.
      if (linked.affectedRows !== expected) throw new Error(`usage of user ${userId} changed while billing; run aborted`);
      ids.push(recordId);
    }
    return ids;
  }

  /** Says why each entry that stays PENDING is not billed yet. */
  async function explainPending(tx: EntityManager): Promise<number> {
    await tx.execute(
      `update usage_logs set reason = case
         when not exists (select 1 from users u where u.id = usage_logs.user_id) then 'UNKNOWN_USER'
         when exists (select 1 from users u where u.id = usage_logs.user_id and u.deleted_at is not null) then 'USER_DELETED'
         else 'NO_PRICE' end
       where status = 'PENDING'`,
      [],
      'run',
    );
    const rows = await tx.execute<{ n: number | string }[]>(`select count(*) as n from usage_logs where status = 'PENDING'`);
    return Number(rows[0].n);
  }

  return {
    async ingest(rootEm, jobRunId) {
      const em = rootEm.fork();
      const counts: IngestCounts = {
        entriesRead: 0,
        entriesAccepted: 0,
        entriesDuplicate: 0,
        entriesRejected: 0,
        entriesPending: 0,
        billingRecordsCreated: 0,
        chargesSucceeded: 0,
        retriesScheduled: 0,
        recordsFailed: 0,
        usersSuspended: 0,
        notice: '',
      };
      const recordIds = await em.transactional(async (tx) => {
        // One ingestion at a time across replicas on PostgreSQL (SQLite has a single writer anyway).
        if (isPostgres(tx)) await tx.execute(`select pg_advisory_xact_lock(72010001)`);
        const now = clock.now();
        try {
          const batches = readUsageFile(deps.logFilePath, { batchSize: 2000 });
          for await (const batch of batches) {
            counts.entriesRead += batch.length;
            await stage(tx, jobRunId, batch.map((entry) => stagingRow(jobRunId, entry, now)));
          }
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
            counts.notice = `usage log file not found: ${deps.logFilePath} (no data)`;
            log.warn({ path: deps.logFilePath }, 'usage log file not found; nothing to ingest');
          } else if (err instanceof UsageFileError) {
            throw new UsageFileUnusable(`usage log file ${deps.logFilePath} is unusable, nothing was billed: ${err.message}`);
          } else {
            throw err;
          }
        }
        await promote(tx, jobRunId, now);
        const stored = await tx.execute<{ status: string; n: number | string }[]>(
          `select status, count(*) as n from usage_logs where job_run_id = ? group by status`,
          [jobRunId],
        );
        for (const row of stored) {
          if (row.status === 'REJECTED') counts.entriesRejected += Number(row.n);
          else counts.entriesAccepted += Number(row.n);
        }
        counts.entriesDuplicate = counts.entriesRead - counts.entriesAccepted - counts.entriesRejected;
        const ids = await bill(tx, jobRunId, now);
        counts.entriesPending = await explainPending(tx);
        return ids;
      });
      counts.billingRecordsCreated = recordIds.length;
      const charged = await deps.billing.chargeNewRecords(em, recordIds);
      Object.assign(counts, {
        chargesSucceeded: charged.chargesSucceeded,
        retriesScheduled: charged.retriesScheduled,
        recordsFailed: charged.recordsFailed,
        usersSuspended: charged.usersSuspended,
      });
      return counts;
    },
  };
}
