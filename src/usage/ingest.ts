/**
 * Usage ingestion, the conductor of the path one entry takes:
 * the file (./parser.ts) -> validation and identity (./entries.ts) -> its
 * usage row (./usage-logs.repository.ts) -> its user's record of this run
 * (../billing/records.repository.ts) -> the charge (../billing/charging.ts)
 * -> the ledger row (../wallets/ledger.repository.ts).
 *
 * The file is streamed in batches, so memory stays flat, and stored in
 * chunks, each its own short transaction, so other writes (AddFunds,
 * charges...) never wait for a whole file: a chunk commits as soon as another
 * write waits for SQLite's one writer. Each usage row is written once, in its
 * final state: per batch the entries are validated and given their identity,
 * the identities already stored are looked up (which also gives the
 * occurrence numbers, see `keyed`), and the new rows are inserted BILLED
 * (pointing at their user's record of this run, reserved `staging`: not
 * chargeable, not listed), PENDING with the reason, or REJECTED.
 *
 * When the file has been read to its end, the records are prepared: their
 * descriptions and line items (from the totals kept in memory) are written in
 * bounded transactions like the chunks, while the records are still staging.
 * Then the run is decided: one transaction bills the earlier PENDING usage
 * that joined its records (sealing those records), says why the rest of the
 * PENDING usage waits, and marks the run SEALING. From then on its records
 * are sealed in bounded transactions, a group at a time: each record's amount
 * becomes the sum of its lines, it becomes due and visible with its event,
 * and its user's balance alert is evaluated. The last one marks the run
 * SEALED. So no write waits for more than a group, however many users a file
 * bills. Until it is decided nothing is billed and the run's rows are not
 * listed; a run that dies before (a malformed JSON array, an unreadable file,
 * a crash at any moment) is rolled back, by itself or by the next run: its
 * rows and staging records are deleted, and the next read of the file finds
 * its entries new and bills each once. A run that dies SEALING is finished by
 * the next run, which seals the records it left (its rows are listed once it
 * has).
 */
import type { Logger } from 'pino';
import type { BillingService } from '../billing/billing.service';
import type { BillingRecordsRepository, UsageRecordDraft } from '../billing/records.repository';
import type { Database, Tx } from '../db/database';
import type { Clock } from '../shared/clock';
import { noMetrics, type Metrics, type UsageEntryCounts } from '../shared/metrics';
import { formatDecimal, INT64_MAX, lineAmount, QUANTITY_SCALE } from '../shared/money';
import type { BalanceAlerts } from '../wallets/balance-alerts';
import type { LedgerRepository } from '../wallets/ledger.repository';
import { rejectedIdentity, usageIdentity, validateEntry, type IdentityKind } from './entries';
import { digestBits, OccurrenceTable } from './occurrence-table';
import { readUsageFile, UsageFileError, UsageSourceError, type RawEntry } from './parser';
import type { PendingUsage, UsageLogsRepository, UsageRowDraft } from './usage-logs.repository';

/** What a run counted (a job run records these), plus a reported, non-fatal problem (e.g. the file is missing). */
export interface IngestCounts {
  entriesRead: number;
  entriesAccepted: number;
  entriesDuplicate: number;
  /** Entries whose producer id was recorded before (or earlier in the file) with other content: not stored. */
  entriesConflict: number;
  entriesRejected: number;
  entriesPending: number;
  billingRecordsCreated: number;
  chargesSucceeded: number;
  retriesScheduled: number;
  recordsFailed: number;
  usersSuspended: number;
  notice: string;
}

export interface IngestService {
  /** Ingests the file and bills what is billable; throws when the file is unusable (nothing is written then). */
  ingest(jobRunId: number): Promise<IngestCounts>;
}

/** What the stage of a run (reading the file, storing, sealing) works with: the database side of a run. */
export interface IngestRunDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  pricing: ReadonlyMap<string, bigint>;
  logFilePath: string;
  /** Longest that opening the usage file or one read of it may take (USAGE_READ_TIMEOUT_MS). */
  readTimeoutMs: number;
  maxFutureSkewMs: number;
  usageLogs: UsageLogsRepository;
  records: BillingRecordsRepository;
  ledger: LedgerRepository;
  /** A sealed run lowers its users' available balances: evaluated in the sealing transaction. */
  alerts: Pick<BalanceAlerts, 'evaluate'>;
}

/** How the end of a run went (ms): its records prepared, then sealed, in bounded transactions. */
export interface SealTimes {
  prepareMs: number;
  sealMs: number;
  sealTransactions: number;
  /** The longest sealing transaction: the longest any other write of the service waited for the seal. */
  longestSealTxMs: number;
}

/** A sealed run: its counts (no charges yet), the records it made, its new entries by what they became, its seal. */
export interface StagedRun {
  counts: IngestCounts;
  recordIds: number[];
  stored: UsageEntryCounts;
  seal: SealTimes;
}

/** Reads the file, stores its entries and seals the run (its records made, not charged). */
export interface IngestRunner {
  stage(jobRunId: number): Promise<StagedRun>;
}

export interface IngestDeps extends IngestRunDeps {
  billing: Pick<BillingService, 'chargeNewRecords'>;
  /** Told of each sealed run's new entries (default: nobody). */
  metrics?: Metrics;
  /** Where runs are staged (the usage writer thread); default: on this event loop, with the deps above. */
  runner?: IngestRunner;
}

/** The file cannot be used: nothing of it was billed. */
export class UsageFileUnusable extends Error {
  override readonly name = 'UsageFileUnusable';
}

/**
 * Why a billable entry waits: billing it in this run would take its line's
 * quantity or amount, or its record's amount, past the largest 64-bit value
 * the database holds exactly. A later run bills it (with a record of its own).
 */
export const OVER_RECORD_LIMIT = 'OVER_RECORD_LIMIT';

/** Entries per batch read from the file (and per identity look-up). */
const BATCH_ENTRIES = 500;
/** Earlier PENDING entries read per statement. */
const PENDING_PAGE = 5000;
/** Rows of an unsealed run deleted per transaction when it is rolled back. */
const ROLLBACK_ROWS = 5000;
/** Batches read from the file ahead of the writer. */
const READ_AHEAD = 4;
/** Records prepared, or sealed, per group: a transaction of either lets a waiting writer in between groups. */
const PREPARE_RECORDS = 500;
const SEAL_RECORDS = 500;
/** Conflicting producer ids named in a run's log line, at most. */
const CONFLICT_IDS_LOGGED = 10;

/**
 * The file's batches, read up to READ_AHEAD ahead of the writer, so that a
 * chunk transaction takes only batches already in hand and never waits for
 * the file (a slow disk or a hung mount) while it holds the writer.
 */
function readAhead(first: IteratorResult<RawEntry[], unknown>, batches: AsyncGenerator<RawEntry[], unknown>) {
  const queue: RawEntry[][] = first.done ? [] : [first.value];
  let ended = first.done === true;
  let failure: { error: unknown } | null = null;
  let reading: Promise<void> | null = null;
  const pump = (): void => {
    if (reading || ended || failure || queue.length >= READ_AHEAD) return;
    reading = batches.next().then(
      (next) => {
        reading = null;
        if (next.done) ended = true;
        else queue.push(next.value);
        pump();
      },
      (error: unknown) => {
        reading = null;
        failure = { error };
      },
    );
  };
  pump();
  return {
    /** A batch in hand now, or null. */
    take(): RawEntry[] | null {
      const batch = queue.shift() ?? null;
      pump();
      return batch;
    },
    /** Waits (outside any transaction) for a batch: false at the end of the file; throws what reading threw. */
    async wait(): Promise<boolean> {
      while (queue.length === 0 && !ended && !failure) await (reading ?? Promise.resolve(pump()));
      if (queue.length > 0) return true;
      if (failure) throw (failure as { error: unknown }).error;
      return false;
    },
  };
}

type UserState = 'live' | 'deleted' | 'unknown';

/** One user's usage billed by this run: per service the total quantity, its priced amount and the entry count. */
type UserTotals = Map<string, { quantity: bigint; amount: bigint; n: number }>;

interface Candidate {
  kind: IdentityKind;
  /** entries.ts's hash (or the producer id for kind 'e'). */
  identity: string;
  /** The dedup key, once the occurrence number is known. */
  key: string;
  /** null: rejected. */
  userId: number | null;
  service: string;
  quantity: string;
  usageAt: number | null;
  reason: string;
  quantityScaled: bigint;
}

/**
 * Two valid entries with one producer id but another user, service, quantity
 * or time: a conflict (the first stands). Entries rejected as invalid are
 * never compared: a bad entry reusing an id is a duplicate as before.
 */
function conflicting(
  a: { userId: number | null; service: string; quantityScaled: bigint; usageAt: number | null },
  b: Candidate,
): boolean {
  if (a.userId === null || b.userId === null) return false;
  return a.userId !== b.userId || a.service !== b.service || a.quantityScaled !== b.quantityScaled || a.usageAt !== b.usageAt;
}

/**
 * Ingestion: the run staged (on this event loop, or by the usage writer
 * thread), then its new entries counted and its records charged here.
 */
export function createIngestService(deps: IngestDeps): IngestService {
  const metrics = deps.metrics ?? noMetrics;
  const runner = deps.runner ?? createIngestRunner(deps);
  return {
    async ingest(jobRunId) {
      const { counts, recordIds, stored, seal } = await runner.stage(jobRunId);
      deps.log.info({ jobRunId, records: recordIds.length, ...seal }, 'ingestion run sealed');
      // The run has sealed (committed): its new entries are counted once, by what they were stored as.
      metrics.usageEntriesStored(stored, 'file');
      const charged = await deps.billing.chargeNewRecords(recordIds);
      return { ...counts, ...charged };
    },
  };
}

export function createIngestRunner(deps: IngestRunDeps): IngestRunner {
  const { db, clock, log, pricing, usageLogs, records, ledger } = deps;
  const pricedServices = [...pricing.keys()];

  /**
   * One run's state across its transactions: the occurrence numbers, the
   * users' states, and each billed user's record of this run with its totals.
   * Every method takes the transaction it works in.
   */
  function createRun(jobRunId: number, now: Date) {
    const occurrences = new OccurrenceTable();
    const users = new Map<number, UserState>();
    /** user -> its (staging) record of this run, in the order records are reserved. */
    const recordOf = new Map<number, number>();
    const totals = new Map<number, UserTotals>();
    /** Each user's record amount so far: the sum of its lines' amounts. */
    const recordAmount = new Map<number, bigint>();
    /** PENDING usage of earlier runs that this run bills: user -> those entries. */
    const earlier = new Map<number, PendingUsage[]>();
    /** PENDING usage of earlier runs that would take its user's record past the limit: it waits again. */
    const overLimit: number[] = [];
    let accepted = 0;
    let rejected = 0;
    /** Entries whose producer id was stored (or came earlier in the file) with other content: not stored. */
    let conflicts = 0;
    /** Some of their ids, for the run's log line. */
    const conflictIds: string[] = [];
    function noteConflict(id: string): void {
      conflicts++;
      if (conflictIds.length < CONFLICT_IDS_LOGGED) conflictIds.push(id);
    }
    /** Of the accepted: stored BILLED (the rest are stored PENDING). */
    let billed = 0;

    /**
     * Adds a billable entry to its user's line for the service, unless that
     * would take the line's quantity or amount, or the record's amount, past
     * INT64_MAX (then it changes nothing and returns false: the entry waits
     * with OVER_RECORD_LIMIT). Amounts are exact: the line is priced again
     * from its whole quantity, rounded once.
     */
    function add(userId: number, service: string, quantity: bigint): boolean {
      const line = totals.get(userId)?.get(service);
      const newQuantity = (line?.quantity ?? 0n) + quantity;
      if (newQuantity > INT64_MAX) return false;
      const newAmount = lineAmount(newQuantity, pricing.get(service)!);
      const newRecordAmount = (recordAmount.get(userId) ?? 0n) - (line?.amount ?? 0n) + newAmount;
      if (newAmount > INT64_MAX || newRecordAmount > INT64_MAX) return false;
      let t = totals.get(userId);
      if (!t) totals.set(userId, (t = new Map()));
      if (line) {
        line.quantity = newQuantity;
        line.amount = newAmount;
        line.n++;
      } else {
        t.set(service, { quantity: newQuantity, amount: newAmount, n: 1 });
      }
      recordAmount.set(userId, newRecordAmount);
      return true;
    }

    /** Reserves this run's staging record of each user (the rows point at it before its lines are known). */
    async function reserveRecords(tx: Tx, userIds: number[]): Promise<void> {
      if (userIds.length === 0) return;
      for (const [userId, recordId] of await records.reserveUsageRecords(tx, userIds, jobRunId, now)) recordOf.set(userId, recordId);
    }

    /**
     * Learns whether users are live, deleted or unknown. Users about to get a
     * record are always asked again in this transaction (their state may have
     * changed since an earlier chunk), and their wallets are held open until
     * it commits; once a user has a staging record, it cannot be deleted (the
     * record is unpaid).
     */
    async function lookUpUsers(tx: Tx, ids: number[], fresh: Set<number>): Promise<void> {
      const ask = [...new Set(ids)].filter((id) => !users.has(id) || (fresh.has(id) && !recordOf.has(id)));
      if (ask.length === 0) return;
      const states = await ledger.holdOpenMany(tx, ask);
      for (const id of ask) {
        const state = states.get(id);
        users.set(id, state === undefined ? 'unknown' : state === 'open' ? 'live' : 'deleted');
      }
    }

    function candidate(entry: RawEntry): Candidate {
      const v = validateEntry(entry, now, deps.maxFutureSkewMs);
      if (v.ok) {
        const u = v.usage;
        const { kind, identity } = usageIdentity(u);
        return { kind, identity, key: '', userId: u.userId, service: u.service, quantity: u.quantity.toString(), usageAt: u.timestamp.getTime(), reason: '', quantityScaled: u.quantity };
      }
      const { kind, identity } = rejectedIdentity(entry.raw);
      return { kind, identity, key: '', userId: null, service: '', quantity: '0', usageAt: null, reason: v.reason, quantityScaled: 0n };
    }

    /**
     * Gives each candidate its key (entries.ts) and drops the ones already
     * stored. The occurrence number needs memory only for identities that were
     * seen before: an entry whose first key (`c:<hash>:1`) is not stored, and
     * that did not occur earlier in this batch, is the first occurrence in the
     * file (an earlier one would have stored or found that key). Other
     * occurrences are counted in `occurrences`, so n = (earlier occurrences
     * counted there) + 1, plus 1 more when this run stored the first one.
     */
    async function keyed(tx: Tx, found: Candidate[]): Promise<Candidate[]> {
      const first = await usageLogs.storedKeys(
        tx,
        found.map((c) => (c.kind === 'e' ? `e:${c.identity}` : `${c.kind}:${c.identity}:1`)),
      );
      /** identity -> did this run store its first occurrence (c:<hash>:1)? Per batch. */
      const seenHere = new Map<string, boolean>();
      /** Producer id -> the first entry of this batch with it (what a later one is compared with). */
      const firstOfId = new Map<string, Candidate>();
      /** Entries whose producer id is stored already: a duplicate, or a conflict if their content differs. */
      const storedBefore: Candidate[] = [];
      const out: Candidate[] = [];
      const later: Candidate[] = [];
      for (const c of found) {
        const id = c.kind + c.identity;
        if (c.kind === 'e') {
          // A producer id stored before, or earlier in this batch, is that usage: the same, or a conflict.
          if (first.has(`e:${c.identity}`)) {
            storedBefore.push(c);
            continue;
          }
          const earlier = firstOfId.get(c.identity);
          if (earlier) {
            if (conflicting(earlier, c)) noteConflict(c.identity);
            continue;
          }
          firstOfId.set(c.identity, c);
          seenHere.set(id, true);
          c.key = `e:${c.identity}`;
          out.push(c);
          continue;
        }
        let storedFirstHere = seenHere.get(id);
        if (storedFirstHere === undefined) {
          const run = first.get(`${c.kind}:${c.identity}:1`);
          if (run === undefined) {
            seenHere.set(id, true);
            c.key = `${c.kind}:${c.identity}:1`;
            out.push(c);
            continue;
          }
          storedFirstHere = run === jobRunId;
          seenHere.set(id, storedFirstHere);
        }
        const { bytes, extra } = digestBits(c.identity);
        const n = occurrences.next(c.kind, bytes, extra) + (storedFirstHere ? 1 : 0);
        c.key = `${c.kind}:${c.identity}:${n}`;
        if (n === 1) continue; // its first key is stored by an earlier run: a duplicate
        later.push(c);
      }
      if (storedBefore.length > 0) {
        const originals = await usageLogs.storedEvents(
          tx,
          storedBefore.map((c) => c.identity),
        );
        for (const c of storedBefore) {
          const original = originals.get(c.identity);
          if (original && conflicting({ ...original, quantityScaled: original.quantity }, c)) noteConflict(c.identity);
        }
      }
      if (later.length === 0) return out;
      const stored = await usageLogs.storedKeys(
        tx,
        later.map((c) => c.key),
      );
      for (const c of later) if (!stored.has(c.key)) out.push(c);
      // Back to file order (the ids of usage rows follow it).
      const keep = new Set(out);
      return found.filter((c) => keep.has(c));
    }

    return {
      /** Marks the run STAGING, and lets PENDING usage of earlier runs that is billable now join its records. */
      async start(tx: Tx): Promise<void> {
        await usageLogs.beginRun(tx, jobRunId);
        // Entry by entry, oldest first (no SQL sum: it could overflow), each within the record limit.
        for (let afterId = 0; ; ) {
          const page = await usageLogs.billablePending(tx, pricedServices, afterId, PENDING_PAGE);
          if (page.length === 0) break;
          for (const u of page) {
            if (!add(u.userId, u.service, u.quantity)) {
              overLimit.push(u.id);
              continue;
            }
            let entries = earlier.get(u.userId);
            if (!entries) earlier.set(u.userId, (entries = []));
            entries.push(u);
          }
          afterId = page[page.length - 1].id;
        }
        await reserveRecords(tx, [...earlier.keys()]);
      },

      /** Stores one batch of entries, each row in its final state (BILLED rows point at staging records). */
      async stage(tx: Tx, entries: RawEntry[]): Promise<void> {
        const found = entries.map(candidate);
        if (found.length === 0) return;
        const fresh = await keyed(tx, found);
        const billableIds = new Set<number>();
        for (const c of fresh) if (c.userId !== null && pricing.has(c.service)) billableIds.add(c.userId);
        await lookUpUsers(
          tx,
          fresh.flatMap((c) => (c.userId === null ? [] : [c.userId])),
          billableIds,
        );
        // Decide each entry first (billed now, or why not), so that records are made only for users billed now.
        const reasons: string[] = [];
        const newUsers = new Set<number>();
        for (const c of fresh) {
          if (c.userId === null) {
            reasons.push(c.reason);
            continue;
          }
          const state = users.get(c.userId);
          if (state === 'unknown') reasons.push('UNKNOWN_USER');
          else if (state === 'deleted') reasons.push('USER_DELETED');
          else if (!pricing.has(c.service)) reasons.push('NO_PRICE');
          else if (!add(c.userId, c.service, c.quantityScaled)) reasons.push(OVER_RECORD_LIMIT);
          else {
            reasons.push('');
            if (!recordOf.has(c.userId)) newUsers.add(c.userId);
          }
        }
        await reserveRecords(tx, [...newUsers]);
        const at = now.getTime();
        const rows: UsageRowDraft[] = fresh.map((c, i) => {
          if (c.userId === null) rejected++;
          else accepted++;
          const status = c.userId === null ? 'REJECTED' : reasons[i] === '' ? 'BILLED' : 'PENDING';
          if (status === 'BILLED') billed++;
          return {
            dedupKey: c.key,
            userId: c.userId,
            service: c.service,
            quantity: c.quantity,
            usageAt: c.usageAt,
            status,
            reason: reasons[i],
            billingRecordId: status === 'BILLED' ? recordOf.get(c.userId!)! : null,
            jobRunId,
            ingestedAt: at,
            source: 'FILE',
          };
        });
        await usageLogs.insert(tx, rows);
      },

      /** The file is read to its end: each record's description and lines, from the totals, in record order. */
      drafts(): UsageRecordDraft[] {
        const drafts: UsageRecordDraft[] = [];
        for (const [userId, recordId] of recordOf) {
          const lines = [...totals.get(userId)!.entries()]
            .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
            .map(([service, l]) => ({ service, quantity: l.quantity, unitPrice: pricing.get(service)!, amount: l.amount }));
          const description = `Usage: ${lines.map((l) => `${formatDecimal(l.quantity, QUANTITY_SCALE)} ${l.service}`).join(', ')} (job run ${jobRunId})`;
          drafts.push({ id: recordId, description, lines });
        }
        return drafts.sort((a, b) => a.id - b.id);
      },

      /**
       * The records are prepared: decides the run, in `tx`. The records of users
       * with earlier PENDING usage are sealed here, with that usage billed (out
       * of the pending totals in the same transaction as their record appears,
       * so no balance ever counts it twice or not at all) and their alerts
       * evaluated; the other PENDING usage is told why it waits; the run is
       * SEALING (finishSealing seals the rest). Returns all its record ids.
       */
      async decide(tx: Tx): Promise<{ ids: number[]; accepted: number; billed: number; rejected: number; pending: number; conflicts: number; conflictIds: string[] }> {
        const now = clock.now();
        const withEarlier = [...earlier.keys()];
        if (withEarlier.length > 0) {
          await records.sealUsageRecords(tx, withEarlier.map((userId) => recordOf.get(userId)!).sort((a, b) => a - b), now);
          for (const [userId, entries] of earlier) {
            const linked = await usageLogs.linkToRecord(tx, userId, recordOf.get(userId)!, entries);
            // Another writer billed some of these entries first: undo the whole run rather than bill twice.
            if (linked !== entries.length) throw new Error(`usage of user ${userId} changed while billing; run aborted`);
          }
          await deps.alerts.evaluate(tx, withEarlier, now);
        }
        const pending = await usageLogs.explainPending(tx, jobRunId, pricedServices, OVER_RECORD_LIMIT, overLimit);
        await usageLogs.beginSealing(tx, jobRunId);
        const ids = [...recordOf.values()].sort((a, b) => a - b);
        return { ids, accepted, billed, rejected, pending, conflicts, conflictIds };
      },
    };
  }

  /**
   * Seals the staging records a SEALING run has left, SEAL_RECORDS at a time:
   * each group made due and visible with its events, and its users' balance
   * alerts evaluated (their available balances move now). A transaction takes
   * groups until another write waits (db.chunkDue). The one that finds none
   * left marks the run SEALED. Returns how many it sealed and its longest
   * transaction (ms).
   */
  async function finishSealing(jobRunId: number): Promise<{ records: number; transactions: number; longestMs: number }> {
    const done = { records: 0, transactions: 0, longestMs: 0 };
    for (let sealed = false; !sealed; ) {
      let started = 0;
      sealed = await db.transaction(async (tx) => {
        started = performance.now();
        do {
          const ids = await records.stagingIds(tx, jobRunId, SEAL_RECORDS);
          if (ids.length === 0) {
            await usageLogs.sealRun(tx, jobRunId);
            return true;
          }
          const now = clock.now();
          await deps.alerts.evaluate(tx, await records.sealUsageRecords(tx, ids, now), now);
          done.records += ids.length;
          await new Promise<void>((resolve) => setImmediate(resolve)); // as for a batch of rows, in stage
        } while (!db.chunkDue(started));
        return false;
      });
      done.transactions++;
      done.longestMs = Math.max(done.longestMs, performance.now() - started);
    }
    return done;
  }

  /**
   * Settles the runs that never sealed. A STAGING run (it died, or its file
   * was unusable) is rolled back: its rows, then its staging records, in
   * bounded transactions; a rolled-back entry is new again, so the next read
   * of its file bills it once. A SEALING run (it died after it was decided) is
   * finished: its remaining records are sealed.
   */
  async function rollBackUnsealed(currentRun: number): Promise<void> {
    const runs = await db.transaction((tx) => usageLogs.unsealedRuns(tx, currentRun));
    for (const run of runs) {
      if (run.state === 'SEALING') {
        const { records: sealed } = await finishSealing(run.jobRunId);
        log.warn({ jobRunId: run.jobRunId, records: sealed }, 'finished sealing the records of a run that stopped while it sealed them');
        continue;
      }
      let rows = 0;
      for (;;) {
        const deleted = await db.transaction(async (tx) => {
          const n = await usageLogs.rollBackSome(tx, run, ROLLBACK_ROWS);
          if (n === 0) await records.discardStaging(tx, run.jobRunId);
          return n;
        });
        if (deleted === 0) break;
        rows += deleted;
      }
      log.warn({ jobRunId: run.jobRunId, rows }, 'rolled back the usage a run stored but never sealed');
    }
  }

  return {
    async stage(jobRunId) {
      const counts: IngestCounts = {
        entriesRead: 0,
        entriesAccepted: 0,
        entriesDuplicate: 0,
        entriesConflict: 0,
        entriesRejected: 0,
        entriesPending: 0,
        billingRecordsCreated: 0,
        chargesSucceeded: 0,
        retriesScheduled: 0,
        recordsFailed: 0,
        usersSuspended: 0,
        notice: '',
      };
      const unusable = (why: string) => new UsageFileUnusable(`usage log file ${deps.logFilePath} is unusable, nothing was billed: ${why}`);
      // Open the file, check it is a regular file and read its first batch before the write transaction starts:
      // a FIFO, a hung mount or a missing file never holds the database's writer.
      const batches = readUsageFile(deps.logFilePath, { batchSize: BATCH_ENTRIES, readTimeoutMs: deps.readTimeoutMs });
      let first: IteratorResult<RawEntry[], unknown>;
      try {
        first = await batches.next();
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
          log.warn({ path: deps.logFilePath }, 'usage log file not found; nothing to ingest');
          first = { done: true, value: undefined };
          counts.notice = `usage log file not found: ${deps.logFilePath} (no data)`;
        } else if (err instanceof UsageFileError || err instanceof UsageSourceError) {
          throw unusable(err.message);
        } else {
          throw err;
        }
      }
      let sealed: Awaited<ReturnType<ReturnType<typeof createRun>['decide']>>;
      let seal: SealTimes;
      try {
        // One ingestion at a time, in this process and across replicas.
        sealed = await db.exclusive('ingestion', async () => {
          await rollBackUnsealed(jobRunId);
          const run = createRun(jobRunId, clock.now());
          const feed = readAhead(first, batches);
          try {
            await db.transaction((tx) => run.start(tx));
            // Stored in chunks: a chunk commits as soon as another write waits (db.chunkDue), and never
            // waits for the file inside its transaction (the batches are read ahead of it).
            while (await feed.wait()) {
              await db.transaction(async (tx) => {
                const started = performance.now();
                for (let batch = feed.take(); batch; batch = db.chunkDue(started) ? null : feed.take()) {
                  counts.entriesRead += batch.length;
                  await run.stage(tx, batch);
                  // better-sqlite3 answers in microtasks: without a turn of the event loop here, no call is read
                  // from the network for the whole chunk, so no writer can be seen waiting and no read answered.
                  await new Promise<void>((resolve) => setImmediate(resolve));
                }
              });
            }
            // The records' lines, in chunks as the rows were: still staging, so nothing is billed yet.
            const drafts = run.drafts();
            const prepareStarted = performance.now();
            for (let next = 0; next < drafts.length; ) {
              // Where the next transaction starts: past what this one committed.
              next = await db.transaction(async (tx) => {
                const started = performance.now();
                let at = next;
                do {
                  await records.prepareUsageRecords(tx, drafts.slice(at, at + PREPARE_RECORDS));
                  at += PREPARE_RECORDS;
                  await new Promise<void>((resolve) => setImmediate(resolve)); // as for a batch of rows, above
                } while (at < drafts.length && !db.chunkDue(started));
                return at;
              });
            }
            const sealStarted = performance.now();
            let decideStarted = 0;
            const decided = await db.transaction((tx) => ((decideStarted = performance.now()), run.decide(tx)));
            const decideMs = performance.now() - decideStarted;
            const finished = await finishSealing(jobRunId);
            seal = {
              prepareMs: Math.round(sealStarted - prepareStarted),
              sealMs: Math.round(performance.now() - sealStarted),
              sealTransactions: finished.transactions + 1,
              longestSealTxMs: Math.round(Math.max(decideMs, finished.longestMs)),
            };
            return decided;
          } catch (err) {
            // Not decided yet: nothing of this run is billed, its rows and staging records go (or the next run removes
            // them). Decided (SEALING): the rest of its records are sealed (or the next run seals them).
            await rollBackUnsealed(0).catch((e: unknown) => log.error({ err: e, jobRunId }, 'rolling back a failed run failed; the next run will'));
            if (err instanceof UsageFileError || err instanceof UsageSourceError) throw unusable(err.message);
            throw err;
          }
        });
      } finally {
        await batches.return('empty'); // closes the file if the run stopped before its end (the value is unused)
      }
      counts.entriesAccepted = sealed.accepted;
      counts.entriesRejected = sealed.rejected;
      counts.entriesConflict = sealed.conflicts;
      counts.entriesDuplicate = counts.entriesRead - sealed.accepted - sealed.rejected - sealed.conflicts;
      counts.entriesPending = sealed.pending;
      if (sealed.conflicts > 0) {
        log.warn(
          { jobRunId, conflicts: sealed.conflicts, ids: sealed.conflictIds },
          'usage entries reuse ids recorded before with other content (user, service, quantity or time): the first stand, these were not billed',
        );
      }
      const recordIds = sealed.ids;
      counts.billingRecordsCreated = recordIds.length;
      const stored: UsageEntryCounts = {
        billed: sealed.billed,
        accepted: 0,
        pending: sealed.accepted - sealed.billed,
        rejected: sealed.rejected,
        duplicate: counts.entriesDuplicate,
        conflict: sealed.conflicts,
      };
      return { counts, recordIds, stored, seal: seal! };
    },
  };
}
