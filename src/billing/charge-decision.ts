/**
 * The one rule that decides what a charge attempt does to a billing record.
 * Pure: no database, no clock, no gRPC. The single path (CreateBillingRecord,
 * ProcessBillingRecord), the batched path (new usage records, due retries) and
 * settlement all ask it, then carry out its answer with guarded writes.
 *
 * The schedule: attempt 1 is the charge at creation; when attempt n is short
 * and n <= maxRetries, retry n is due base x 2^(n-1) later; when attempt
 * maxRetries + 1 is short the record is FAILED and its user suspended for
 * non-payment. A settlement after a top-up is not an attempt: it pays what
 * fits and leaves the rest as it was. A manual attempt on a FAILED record
 * counts, and leaves it FAILED while the balance is short.
 */
import type { BillingRecordStatus } from './billing-record.entity';
import { nextAttemptDelayMs, type RetryPolicy } from './retry-policy';

/** Why an attempt runs. */
export type ChargeTrigger =
  | 'new' // the first attempt of a record just created
  | 'retry' // the scheduler or ProcessRetries: only when still PENDING and due
  | 'manual' // ProcessBillingRecord: now, whatever the schedule says
  | 'settle'; // after a top-up, or the settlement sweep: pays what fits, never counts

/** What the decision needs to know of a record. */
export interface ChargeableRecord {
  status: BillingRecordStatus;
  amount: bigint;
  attemptCount: number;
  nextAttemptAt: Date | null;
}

export type ChargeDecision =
  /** PAID already: nothing to do. */
  | { action: 'ALREADY_PAID' }
  /** Not this trigger's turn (not due, already attempted, or a settlement that does not fit): change nothing. */
  | { action: 'SKIP' }
  /** Debit the amount (nothing when it is 0) and mark the record PAID with this attempt count. */
  | { action: 'CHARGE'; attemptCount: number }
  /** Short: stay PENDING, retry at `nextAttemptAt`. */
  | { action: 'RETRY'; attemptCount: number; nextAttemptAt: Date }
  /** Short with no retry left: FAILED; `suspendUser` when this attempt is the one that failed it. */
  | { action: 'FAIL'; attemptCount: number; suspendUser: boolean };

/** The reason a short attempt records on the record. */
export const INSUFFICIENT_FUNDS = 'INSUFFICIENT_FUNDS';

/**
 * Decides one attempt on `record` for `trigger`, given the wallet's spendable
 * `balance` now (null when the wallet cannot be debited at all: a deleted
 * user's closed wallet) and the time `now`.
 */
export function decideCharge(
  record: ChargeableRecord,
  balance: bigint | null,
  policy: RetryPolicy,
  trigger: ChargeTrigger,
  now: Date,
): ChargeDecision {
  if (record.status === 'PAID') return { action: 'ALREADY_PAID' };
  if (trigger === 'new' && record.attemptCount > 0) return { action: 'SKIP' }; // someone made the first attempt
  if (trigger === 'retry') {
    const due = record.status === 'PENDING' && record.nextAttemptAt !== null && record.nextAttemptAt.getTime() <= now.getTime();
    if (!due) return { action: 'SKIP' };
  }
  const pays = record.amount === 0n || (balance !== null && balance >= record.amount);
  if (trigger === 'settle') return pays ? { action: 'CHARGE', attemptCount: record.attemptCount } : { action: 'SKIP' };
  const attemptCount = record.attemptCount + 1;
  if (pays) return { action: 'CHARGE', attemptCount };
  if (record.status === 'FAILED') return { action: 'FAIL', attemptCount, suspendUser: false };
  const delay = nextAttemptDelayMs(policy, attemptCount);
  if (delay === null) return { action: 'FAIL', attemptCount, suspendUser: true };
  return { action: 'RETRY', attemptCount, nextAttemptAt: new Date(now.getTime() + delay) };
}
