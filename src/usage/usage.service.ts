/**
 * Usage as other services send and read it: events recorded in batches
 * (RecordUsage, StreamUsage), summaries, and the stored entries, paged.
 * (The usage file is read by ./ingest.ts; both share one identity space, the
 * producer's event id, and one billing path: a PENDING entry of a live user
 * and a priced service is billed by the next billing run.)
 */
import type { CallContext } from '../shared/context';
import { invalidArgument } from '../shared/errors';
import { lineAmount } from '../shared/money';
import { noMetrics, type Metrics, type UsageEntryCounts } from '../shared/metrics';
import { readPage, type PageRequest } from '../shared/paging';
import type { UsageLog, UsageLogStatus, UsageSource } from './usage-log.entity';
import type { UsageLogsRepository } from './usage-logs.repository';
import { createUsageRecorder, type UsageRecorder, type UsageRecorderDeps } from './usage-recorder';

/** One event as a producer sends it (the handler has only unwrapped the protobuf). */
export interface UsageEventInput {
  id: string;
  /** As sent (int64): validated here like a file entry's userId. */
  userId: bigint;
  service: string;
  quantity: string;
  time: Date | undefined;
}

export type UsageEventStatus = 'ACCEPTED' | 'DUPLICATE' | 'CONFLICT' | 'REJECTED' | 'PENDING';

export interface UsageEventResult {
  status: UsageEventStatus;
  /** The stored entry (new or original); null when REJECTED. */
  usageId: number | null;
  reason: string;
  message: string;
}

export interface UsageSummaryRow {
  service: string;
  periodStart: Date;
  quantity: bigint;
  /** quantity x today's unit price, rounded once; 0 without a price. */
  amount: bigint;
  entries: number;
}

export type SummaryGroupBy = 'SERVICE' | 'HOUR' | 'DAY';

export interface UsageService {
  /** Records a batch of events: one result per event, in order, all durable when it returns. */
  /** `after`: write only after it has settled (the previous batch of the same stream: see TransactionOptions.after). */
  recordUsage(ctx: CallContext, events: readonly UsageEventInput[], opts?: { after?: Promise<unknown> }): Promise<UsageEventResult[]>;
  summary(
    ctx: CallContext,
    query: { userId: number | null; service: string | null; from: Date | undefined; to: Date | undefined; groupBy: SummaryGroupBy },
  ): Promise<UsageSummaryRow[]>;
  listUsageLogs(
    ctx: CallContext,
    filter: { userId: number | null; status: UsageLogStatus | null; source: UsageSource | null; from: Date | null; to: Date | null },
    page: PageRequest,
  ): Promise<{ items: UsageLog[]; nextPageToken: string }>;
}

export interface UsageDeps extends UsageRecorderDeps {
  /** Most events per batch (USAGE_BATCH_MAX). */
  batchMax: number;
  /** Told of each answered batch's results, after their commit (default: nobody). */
  metrics?: Metrics;
  /** Where batches are written (the usage writer thread); default: on this event loop, with the deps above. */
  recorder?: UsageRecorder;
}

/** The metrics outcome of each answer. */
const OUTCOME_OF: Record<UsageEventStatus, keyof UsageEntryCounts> = {
  ACCEPTED: 'accepted',
  PENDING: 'pending',
  REJECTED: 'rejected',
  DUPLICATE: 'duplicate',
  CONFLICT: 'conflict',
};

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
/** The longest period a summary covers. */
const MAX_SUMMARY_MS = 366 * DAY_MS;

export function createUsageService(deps: UsageDeps): UsageService {
  const { pricing, usageLogs } = deps;
  const metrics = deps.metrics ?? noMetrics;
  const recorder = deps.recorder ?? createUsageRecorder(deps);

  /** Counts a batch's answers (all committed, or never stored) as source 'api'. */
  function observe(results: readonly UsageEventResult[]): UsageEventResult[] {
    const counts: UsageEntryCounts = { billed: 0, accepted: 0, pending: 0, rejected: 0, duplicate: 0, conflict: 0 };
    for (const r of results) counts[OUTCOME_OF[r.status]]++;
    metrics.usageEntriesStored(counts, 'api');
    return results as UsageEventResult[];
  }

  return {
    async recordUsage(ctx, events, opts = {}) {
      if (events.length > deps.batchMax) {
        throw invalidArgument('events', 'BATCH_TOO_LARGE', `a batch holds at most ${deps.batchMax} events (USAGE_BATCH_MAX), got ${events.length}`);
      }
      return observe(await recorder.record(ctx.signal, events, opts.after));
    },

    async summary(_ctx, q) {
      if (!q.from) throw invalidArgument('start_time', 'MISSING_TIME_RANGE', 'start_time is required');
      if (!q.to) throw invalidArgument('end_time', 'MISSING_TIME_RANGE', 'end_time is required');
      const span = q.to.getTime() - q.from.getTime();
      if (!(span > 0)) throw invalidArgument('end_time', 'INVALID_TIME_RANGE', 'end_time must be after start_time');
      if (span > MAX_SUMMARY_MS) throw invalidArgument('end_time', 'INVALID_TIME_RANGE', 'a summary covers at most 366 days');
      const periodMs = q.groupBy === 'HOUR' ? HOUR_MS : q.groupBy === 'DAY' ? DAY_MS : null;
      const rows = await usageLogs.summary({ userId: q.userId, service: q.service, from: q.from, to: q.to, periodMs });
      return rows.map((r) => {
        const price = pricing.get(r.service);
        return {
          service: r.service,
          periodStart: new Date(r.periodStart),
          quantity: r.quantity,
          amount: price === undefined ? 0n : lineAmount(r.quantity, price),
          entries: r.entries,
        };
      });
    },

    listUsageLogs: (ctx, filter, page) => usageLogs.list(ctx.em, filter, readPage(page, filter)),
  };
}
