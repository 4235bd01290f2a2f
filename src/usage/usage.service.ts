/**
 * Usage as other services send and read it: events recorded in batches
 * (RecordUsage, StreamUsage), summaries, and the stored entries, paged.
 * (The usage file is read by ./ingest.ts; both share one identity space, the
 * producer's event id, and one billing path: a PENDING entry of a live user
 * and a priced service is billed by the next billing run.)
 */
import type { Database } from '../db/database';
import type { CallContext } from '../shared/context';
import type { Clock } from '../shared/clock';
import { AppError, invalidArgument } from '../shared/errors';
import { lineAmount } from '../shared/money';
import { noMetrics, type Metrics, type UsageEntryCounts } from '../shared/metrics';
import { readPage, type PageRequest } from '../shared/paging';
import type { BalanceAlerts } from '../wallets/balance-alerts';
import type { LedgerRepository } from '../wallets/ledger.repository';
import { validateEntry, type RejectReason } from './entries';
import type { RawEntry } from './parser';
import type { UsageLog, UsageLogStatus, UsageSource } from './usage-log.entity';
import type { UsageLogsRepository, UsageRowDraft } from './usage-logs.repository';

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

/** CONFLICT's reason: the id was recorded before with other content. */
export const ID_REUSED = 'EVENT_ID_REUSED';

/** How long a batch waits for an ingestion run that holds some of its ids unsealed, at most. */
const OPEN_RUN_WAIT_MS = 120_000;
const OPEN_RUN_POLL_MS = 50;

/** Thrown inside a batch's transaction: an id is held by the rows of a run that may still roll them back. */
class HeldByOpenRun extends Error {
  constructor(readonly jobRunId: number) {
    super(`usage held by ingestion run ${jobRunId}, not sealed yet`);
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

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

export interface UsageDeps {
  db: Database;
  clock: Clock;
  pricing: ReadonlyMap<string, bigint>;
  maxFutureSkewMs: number;
  /** Most events per batch (USAGE_BATCH_MAX). */
  batchMax: number;
  usageLogs: UsageLogsRepository;
  ledger: LedgerRepository;
  /** Told of each answered batch's results, after their commit (default: nobody). */
  metrics?: Metrics;
  /** Usage recorded lowers available balances: evaluated in the batch's transaction. */
  alerts: Pick<BalanceAlerts, 'evaluate'>;
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

/** A valid event: its identity is its id; its content is what DUPLICATE compares. */
interface ValidEvent {
  index: number;
  id: string;
  userId: number;
  service: string;
  quantity: bigint;
  usageAt: number;
}

const rejected = (reason: RejectReason | 'MISSING_ID', message: string): UsageEventResult => ({ status: 'REJECTED', usageId: null, reason, message });

/** The same usage: same user, service, exact quantity and instant. */
const sameContent = (a: { userId: number | null; service: string; quantity: bigint; usageAt: number | null }, b: ValidEvent) =>
  a.userId === b.userId && a.service === b.service && a.quantity === b.quantity && a.usageAt === b.usageAt;

export function createUsageService(deps: UsageDeps): UsageService {
  const { db, clock, pricing, usageLogs, ledger, alerts } = deps;
  const metrics = deps.metrics ?? noMetrics;

  /** Counts a batch's answers (all committed, or never stored) as source 'api'. */
  function observe(results: readonly UsageEventResult[]): UsageEventResult[] {
    const counts: UsageEntryCounts = { billed: 0, accepted: 0, pending: 0, rejected: 0, duplicate: 0, conflict: 0 };
    for (const r of results) counts[OUTCOME_OF[r.status]]++;
    metrics.usageEntriesStored(counts, 'api');
    return results as UsageEventResult[];
  }

  /** Validates an event with the file's rules (and reasons); an id is required here. */
  function validate(e: UsageEventInput, index: number, now: Date): ValidEvent | UsageEventResult {
    if (e.id === '') return rejected('MISSING_ID', 'id is required: it is the event identity that makes a retry safe');
    if (e.time === undefined || Number.isNaN(e.time.getTime())) return rejected('INVALID_TIMESTAMP', 'time is required');
    const entry: RawEntry = {
      ordinal: index,
      line: 0,
      raw: '',
      value: { id: e.id, userId: e.userId.toString(), service: e.service, quantity: e.quantity, timestamp: e.time.toISOString() },
    };
    const v = validateEntry(entry, now, deps.maxFutureSkewMs);
    if (!v.ok) return rejected(v.reason, v.message);
    return { index, id: e.id, userId: v.usage.userId, service: v.usage.service, quantity: v.usage.quantity, usageAt: v.usage.timestamp.getTime() };
  }

  /** Records the valid events of a batch in one transaction, filling in their results (all of them, every attempt). */
  async function recordOnce(ctx: CallContext, valid: ValidEvent[], results: (UsageEventResult | null)[], now: Date, after?: Promise<unknown>): Promise<void> {
    await db.groupWrite(async (tx) => {
      const eventIds = [...new Set(valid.map((v) => v.id))];
      const stored = await usageLogs.storedEvents(tx, eventIds);
      for (const before of stored.values()) if (before.unsealedRun !== null) throw new HeldByOpenRun(before.unsealedRun);
      /** The first event of this batch with each id not stored yet: the row it becomes. */
      const firstHere = new Map<string, ValidEvent>();
      for (const event of valid) if (!stored.has(event.id) && !firstHere.has(event.id)) firstHere.set(event.id, event);
      const userIds = [...new Set([...firstHere.values()].map((e) => e.userId))];
      const states = await ledger.holdOpenMany(tx, userIds);
      // A user created meanwhile must count this usage exactly once: either their creation sees it, or this batch
      // sees them (PostgreSQL: CreateUser takes the same id's lock exclusively; SQLite has one writer).
      const unknown = userIds.filter((id) => !states.has(id));
      if (unknown.length > 0 && (await db.lockUsers(tx, unknown, 'shared'))) {
        for (const [id, state] of await ledger.holdOpenMany(tx, unknown)) states.set(id, state);
      }
      const reasons = new Map<string, string>();
      const rows: UsageRowDraft[] = [...firstHere.values()].map((event) => {
        const state = states.get(event.userId);
        const reason = state === undefined ? 'UNKNOWN_USER' : state === 'closed' ? 'USER_DELETED' : pricing.has(event.service) ? '' : 'NO_PRICE';
        reasons.set(event.id, reason);
        return {
          dedupKey: `e:${event.id}`,
          userId: event.userId,
          service: event.service,
          quantity: event.quantity.toString(),
          usageAt: event.usageAt,
          status: 'PENDING',
          reason,
          billingRecordId: null,
          jobRunId: null,
          ingestedAt: now.getTime(),
          source: 'API',
        };
      });
      const inserted = await usageLogs.insertEvents(tx, rows);
      // Keys another writer stored first (a replica, the usage file, the same batch sent twice at once): theirs stand.
      const lost = [...firstHere.keys()].filter((id) => !inserted.has(`e:${id}`));
      if (lost.length > 0) {
        for (const [id, before] of await usageLogs.storedEvents(tx, lost)) {
          if (before.unsealedRun !== null) throw new HeldByOpenRun(before.unsealedRun);
          stored.set(id, before);
        }
        const vanished = lost.filter((id) => !stored.has(id));
        if (vanished.length > 0) throw new AppError('ABORTED', 'CONCURRENT_UPDATE', 'usage was stored and removed again while recording it; retry');
      }
      // The users whose available balance this batch lowered: new rows of live users and priced services.
      await alerts.evaluate(tx, [...new Set([...firstHere.values()].filter((e) => inserted.has(`e:${e.id}`) && reasons.get(e.id) === '').map((e) => e.userId))], now);
      const answered = new Set<string>();
      for (const event of valid) {
        const mine = inserted.get(`e:${event.id}`);
        if (mine !== undefined && !answered.has(event.id)) {
          answered.add(event.id);
          const reason = reasons.get(event.id)!;
          results[event.index] = { status: reason === '' ? 'ACCEPTED' : 'PENDING', usageId: mine, reason, message: '' };
          continue;
        }
        const original = mine !== undefined ? { ...firstHere.get(event.id)!, id: mine } : stored.get(event.id)!;
        results[event.index] = sameContent(original, event)
          ? { status: 'DUPLICATE', usageId: original.id, reason: '', message: '' }
          : { status: 'CONFLICT', usageId: original.id, reason: ID_REUSED, message: 'this id was recorded before with other content (user, service, quantity or time)' };
      }
    }, { signal: ctx.signal, after });
  }

  return {
    async recordUsage(ctx, events, opts = {}) {
      if (events.length > deps.batchMax) {
        throw invalidArgument('events', 'BATCH_TOO_LARGE', `a batch holds at most ${deps.batchMax} events (USAGE_BATCH_MAX), got ${events.length}`);
      }
      const now = clock.now();
      const results: (UsageEventResult | null)[] = events.map(() => null);
      const valid: ValidEvent[] = [];
      events.forEach((e, i) => {
        const v = validate(e, i, now);
        if ('status' in v) results[i] = v;
        else valid.push(v);
      });
      if (valid.length === 0) return observe(results as UsageEventResult[]);
      // An id stored by an ingestion run that has not sealed yet is undecided: the run may still roll its rows back
      // (a cut file), and this event would be lost had it been answered DUPLICATE. Wait, outside any transaction,
      // until that run has sealed or rolled back, then record the batch again.
      for (const giveUpAt = Date.now() + OPEN_RUN_WAIT_MS; ; ) {
        try {
          await recordOnce(ctx, valid, results, now, opts.after);
          return observe(results as UsageEventResult[]);
        } catch (err) {
          if (!(err instanceof HeldByOpenRun)) throw err;
          while (await usageLogs.runIsOpen(err.jobRunId)) {
            if (Date.now() > giveUpAt) {
              throw new AppError('UNAVAILABLE', 'USAGE_RUN_IN_PROGRESS', 'a usage file run that holds some of these ids is still running; retry');
            }
            ctx.signal.throwIfAborted();
            await sleep(OPEN_RUN_POLL_MS);
          }
        }
      }
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
