/**
 * Records batches of usage events (RecordUsage, StreamUsage): validation with
 * the file's rules, then one write per batch that decides, per event, ACCEPTED,
 * PENDING, DUPLICATE or CONFLICT. The usage service calls it on the event loop,
 * or through the usage writer thread (./usage-writer.ts), which runs this same
 * code on a connection of its own.
 */
import type { Database } from '../db/database';
import type { Clock } from '../shared/clock';
import { AppError } from '../shared/errors';
import type { BalanceAlerts } from '../wallets/balance-alerts';
import type { LedgerRepository } from '../wallets/ledger.repository';
import { validateEntry, type RejectReason } from './entries';
import type { RawEntry } from './parser';
import type { UsageEventInput, UsageEventResult } from './usage.service';
import type { UsageLogsRepository, UsageRowDraft } from './usage-logs.repository';

/** CONFLICT's reason: the id was recorded before with other content. */
const ID_REUSED = 'EVENT_ID_REUSED';

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

export interface UsageRecorder {
  /**
   * One result per event, in order, all durable when it resolves. `after`: write only after it has settled (the
   * previous batch of the same stream: see TransactionOptions.after).
   */
  record(signal: AbortSignal, events: readonly UsageEventInput[], after?: Promise<unknown>): Promise<UsageEventResult[]>;
}

export interface UsageRecorderDeps {
  db: Database;
  clock: Clock;
  pricing: ReadonlyMap<string, bigint>;
  maxFutureSkewMs: number;
  usageLogs: UsageLogsRepository;
  ledger: LedgerRepository;
  /** Usage recorded lowers available balances: evaluated in the batch's transaction. */
  alerts: Pick<BalanceAlerts, 'evaluate'>;
}

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

export function createUsageRecorder(deps: UsageRecorderDeps): UsageRecorder {
  const { db, clock, pricing, usageLogs, ledger, alerts } = deps;

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
  async function recordOnce(signal: AbortSignal, valid: ValidEvent[], results: (UsageEventResult | null)[], now: Date, after?: Promise<unknown>): Promise<void> {
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
    }, { signal, after });
  }

  return {
    async record(signal, events, after) {
      const now = clock.now();
      const results: (UsageEventResult | null)[] = events.map(() => null);
      const valid: ValidEvent[] = [];
      events.forEach((e, i) => {
        const v = validate(e, i, now);
        if ('status' in v) results[i] = v;
        else valid.push(v);
      });
      if (valid.length === 0) return results as UsageEventResult[];
      // An id stored by an ingestion run still reading its file is undecided: the run may still roll its rows back
      // (a cut file), and this event would be lost had it been answered DUPLICATE. Wait, outside any transaction,
      // until that run is decided (SEALING or SEALED) or rolled back, then record the batch again.
      for (const giveUpAt = Date.now() + OPEN_RUN_WAIT_MS; ; ) {
        try {
          await recordOnce(signal, valid, results, now, after);
          return results as UsageEventResult[];
        } catch (err) {
          if (!(err instanceof HeldByOpenRun)) throw err;
          while (await usageLogs.runIsOpen(err.jobRunId)) {
            if (Date.now() > giveUpAt) {
              throw new AppError('UNAVAILABLE', 'USAGE_RUN_IN_PROGRESS', 'a usage file run that holds some of these ids is still running; retry');
            }
            signal.throwIfAborted();
            await sleep(OPEN_RUN_POLL_MS);
          }
        }
      }
    }
  };
}
