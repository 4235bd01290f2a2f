/**
 * Charging: carries out the charge decision (./charge-decision.ts) with
 * guarded writes through the doors of the records, the ledger and the users.
 * One attempt on one record (CreateBillingRecord, ProcessBillingRecord,
 * settlement) or many at once (new usage records, due retries: one
 * transaction per GROUP records, a few set-based statements instead of a
 * commit per record), with the same decision either way.
 *
 * One attempt on one record is a short write: on SQLite it goes through group
 * commit (db.groupWrite), so attempts on different records that arrive
 * together share one COMMIT, each in its own savepoint; an attempt that lost
 * to another charger is rolled back to its savepoint alone and read again in
 * a later transaction, and nobody is answered before the COMMIT.
 *
 * Every write stays guarded: the debit is a conditional UPDATE of the wallet,
 * the ledger allows one DEBIT per record, and a record moves only from the
 * state it was read in. If another charger got there first, the attempt is
 * read again (one record), or the batch is rolled back and its records are
 * charged one by one.
 */
import type { Logger } from 'pino';
import type { Database, Tx } from '../db/database';
import { isUniqueViolation } from '../db/errors';
import type { Clock } from '../shared/clock';
import { AppError, notFound } from '../shared/errors';
import { noMetrics, type Metrics } from '../shared/metrics';
import type { UsersRepository } from '../users/users.repository';
import type { Debit, LedgerRepository } from '../wallets/ledger.repository';
import type { ChargeOutcome, RetryCounts } from './billing.types';
import { decideCharge, type ChargeTrigger } from './charge-decision';
import { StaleRecord, type BillingRecordsRepository, type ChargeRow, type Transition } from './records.repository';
import type { RetryPolicy } from './retry-policy';

/** What one attempt did. SKIPPED: nothing (not due, not this trigger's turn, or a settlement that does not fit). */
export interface AttemptResult {
  outcome: ChargeOutcome | 'SKIPPED';
  userSuspended: boolean;
}

export interface Charging {
  /**
   * One attempt on one record; NOT_FOUND when it does not exist. With a
   * `signal` (the caller's), an attempt not yet begun when the caller goes
   * away is not made (the signal's reason is thrown).
   */
  chargeOne(id: number, trigger: Exclude<ChargeTrigger, 'retry'>, signal?: AbortSignal): Promise<AttemptResult>;
  /** The first attempt of new records, or the due retries among `ids`, in batches. */
  chargeMany(ids: readonly number[], trigger: 'new' | 'retry'): Promise<RetryCounts>;
  /** Pays the user's unpaid records oldest first (what fits); reactivates a user suspended for non-payment. */
  settleUser(userId: number): Promise<{ counts: RetryCounts; paidRecordIds: number[] }>;
}

export interface ChargingDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  policy: RetryPolicy;
  records: BillingRecordsRepository;
  ledger: LedgerRepository;
  users: UsersRepository;
  /** Told whenever a retry is scheduled, so the in-process scheduler can wake up in time. */
  onRetryScheduled?: (at: Date) => void;
  /** Told of every committed attempt that moved a record, and of every user it suspended (default: nobody). */
  metrics?: Metrics;
}

/**
 * Records charged by one transaction on the batched path, by trigger. New
 * records come after an ingestion run, while other writes (top-ups, usage)
 * go on: small transactions, so a write that arrives meanwhile waits for a
 * few hundred records at most. Due retries in larger ones: smaller
 * transactions made 10,000 retries due at once later (see README,
 * Performance).
 */
const GROUP = { new: 500, retry: 5000 } as const;
/** How often one record is read again after another charger moved it first, before the caller gets ABORTED. */
const ROUNDS = 10;

export const emptyRetryCounts = (): RetryCounts => ({ chargesSucceeded: 0, retriesScheduled: 0, recordsFailed: 0, usersSuspended: 0 });

export function addCounts(to: RetryCounts, from: RetryCounts): void {
  for (const k of Object.keys(from) as (keyof RetryCounts)[]) to[k] += from[k];
}

const OUTCOME = { CHARGE: 'CHARGED', RETRY: 'RETRY_SCHEDULED', FAIL: 'FAILED' } as const;

export function createCharging(deps: ChargingDeps): Charging {
  const { db, clock, log, policy, records, ledger, users } = deps;
  const metrics = deps.metrics ?? noMetrics;

  /** After the commit only: a rolled-back attempt charged nobody. */
  function observe(outcome: ChargeOutcome | 'SKIPPED', trigger: ChargeTrigger, userSuspended: boolean): void {
    if (outcome === 'CHARGED' || outcome === 'RETRY_SCHEDULED' || outcome === 'FAILED') metrics.chargeAttempted(outcome, trigger);
    if (userSuspended) metrics.userSuspended();
  }

  /**
   * Decides and writes the attempts on `rows` (in order, each against the
   * balance the ones before it left) in `tx`. Throws StaleRecord when a guard
   * does not hold.
   */
  async function attempt(tx: Tx, rows: readonly ChargeRow[], trigger: ChargeTrigger, now: Date) {
    const balances = await ledger.lockBalances(
      tx,
      rows.map((r) => r.userId),
    );
    const transitions: Transition[] = [];
    const debits: Debit[] = [];
    const outcomes: { id: number; outcome: ChargeOutcome | 'SKIPPED' }[] = [];
    for (const row of rows) {
      const decision = decideCharge(row, balances.get(row.userId) ?? null, policy, trigger, now);
      if (decision.action === 'ALREADY_PAID' || decision.action === 'SKIP') {
        outcomes.push({ id: row.id, outcome: decision.action === 'SKIP' ? 'SKIPPED' : 'ALREADY_PAID' });
        continue;
      }
      if (decision.action === 'CHARGE' && row.amount > 0n) {
        balances.set(row.userId, balances.get(row.userId)! - row.amount);
        debits.push({ userId: row.userId, amount: row.amount, billingRecordId: row.id });
      }
      transitions.push({ row, decision });
      outcomes.push({ id: row.id, outcome: OUTCOME[decision.action] });
    }
    if (debits.length === 1) {
      if (!(await ledger.debit(tx, debits[0], now))) throw new StaleRecord();
    } else if (!(await ledger.debitMany(tx, debits, balances, now))) {
      throw new StaleRecord();
    }
    await records.apply(tx, transitions, now);
    const suspended = new Set<number>();
    for (const { row, decision } of transitions) {
      if (decision.action !== 'FAIL' || !decision.suspendUser) continue;
      const reason = `non-payment: billing record ${row.id} failed after ${decision.attemptCount} attempts`;
      if (await users.suspendForNonPayment(tx, row.userId, row.id, reason, now)) suspended.add(row.id);
    }
    // Users suspended for non-payment with nothing unpaid left are active again.
    const paidUsers = [...new Set(transitions.filter((t) => t.decision.action === 'CHARGE').map((t) => t.row.userId))];
    if (paidUsers.length > 0) await users.reactivateIfSettled(tx, paidUsers, now);
    const retryAt = transitions.reduce<number | null>(
      (min, t) => (t.decision.action === 'RETRY' ? Math.min(min ?? Infinity, t.decision.nextAttemptAt.getTime()) : min),
      null,
    );
    return { outcomes, suspended, retryAt };
  }

  const conflict = (err: unknown) => err instanceof StaleRecord || isUniqueViolation(err);

  async function chargeOne(id: number, trigger: ChargeTrigger, signal?: AbortSignal): Promise<AttemptResult> {
    for (let round = 0; ; round++) {
      try {
        // A lost round is rolled back to its savepoint alone and submitted again: it joins a later group.
        const done = await db.groupWrite(async (tx) => {
          const now = clock.now();
          const rows = await records.readForCharge(tx, [id], trigger === 'retry' ? now : undefined);
          if (rows.length === 0) {
            if (trigger === 'retry') return { outcomes: [{ id, outcome: 'SKIPPED' as const }], suspended: new Set<number>(), retryAt: null };
            throw notFound('BILLING_RECORD_NOT_FOUND', `billing record ${id} not found`);
          }
          return attempt(tx, rows, trigger, now);
        }, { signal });
        if (done.retryAt !== null) deps.onRetryScheduled?.(new Date(done.retryAt));
        const { outcome } = done.outcomes[0];
        observe(outcome, trigger, done.suspended.has(id));
        if (outcome !== 'SKIPPED') log.info({ billingRecordId: id, trigger, outcome }, 'charge attempt');
        return { outcome, userSuspended: done.suspended.has(id) };
      } catch (err) {
        // Another charger moved the record (or debited it) between our read and write: read it again.
        if (!conflict(err)) throw err;
        if (round + 1 >= ROUNDS) {
          throw new AppError('ABORTED', 'CONCURRENT_UPDATE', `billing record ${id} kept changing under concurrent charges; try again`);
        }
      }
    }
  }

  function tally(counts: RetryCounts, outcome: ChargeOutcome | 'SKIPPED', userSuspended: boolean): void {
    if (outcome === 'CHARGED') counts.chargesSucceeded++;
    else if (outcome === 'RETRY_SCHEDULED') counts.retriesScheduled++;
    else if (outcome === 'FAILED') counts.recordsFailed++;
    if (userSuspended) counts.usersSuspended++;
  }

  return {
    chargeOne: (id, trigger, signal) => chargeOne(id, trigger, signal),

    async chargeMany(ids, trigger) {
      const counts = emptyRetryCounts();
      for (let i = 0; i < ids.length; i += GROUP[trigger]) {
        const chunk = ids.slice(i, i + GROUP[trigger]);
        let started = 0;
        try {
          const done = await db.transaction(async (tx) => {
            started = performance.now();
            const now = clock.now();
            const read = await records.readForCharge(tx, chunk, trigger === 'retry' ? now : undefined);
            // In the given order (the order balances are drawn down in); a retry no longer due is simply absent.
            const byId = new Map(read.map((r) => [r.id, r]));
            const rows = chunk.flatMap((id) => byId.get(id) ?? []);
            return attempt(tx, rows, trigger, now);
          });
          const ms = Math.round(performance.now() - started);
          if (done.retryAt !== null) deps.onRetryScheduled?.(new Date(done.retryAt));
          const batch = emptyRetryCounts();
          const each = log.isLevelEnabled('debug');
          for (const { id, outcome } of done.outcomes) {
            tally(batch, outcome, done.suspended.has(id));
            observe(outcome, trigger, done.suspended.has(id));
            if (each && outcome !== 'SKIPPED') log.debug({ billingRecordId: id, trigger, outcome }, 'charge attempt');
          }
          addCounts(counts, batch);
          log.info({ trigger, records: chunk.length, ms, ...batch }, 'charge attempts (batch)');
        } catch (err) {
          if (!conflict(err)) throw err;
          log.info({ records: chunk.length, trigger }, 'batch charge met a concurrent change; charging one by one');
          for (const id of chunk) {
            const r = await chargeOne(id, trigger);
            tally(counts, r.outcome, r.userSuspended);
          }
        }
      }
      return counts;
    },

    async settleUser(userId) {
      const counts = emptyRetryCounts();
      const paidRecordIds: number[] = [];
      for (const id of await records.unpaidIds(userId)) {
        const result = await chargeOne(id, 'settle');
        tally(counts, result.outcome, result.userSuspended);
        if (result.outcome === 'CHARGED') paidRecordIds.push(id);
      }
      // A user suspended for non-payment with nothing unpaid (settled elsewhere, say) is reactivated too;
      // the write transaction is only needed when the user is suspended for non-payment at all.
      if (await users.isSuspendedForNonPayment(userId)) {
        await db.transaction((tx) => users.reactivateIfSettled(tx, [userId], clock.now()));
      }
      return { counts, paidRecordIds };
    },
  };
}
