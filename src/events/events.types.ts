/**
 * The events of the event stream (proto/billing/v1/event_service.proto): one
 * type per kind of change, each with its payload. Money is integer micros.
 */

export interface EventPayloads {
  'user.created': { name: string; email: string };
  /** billingRecordId: the record whose failure suspended the user; 0 when an operator did. */
  'user.suspended': { reason: string; billingRecordId: number };
  /** settled: reactivated because nothing is unpaid any more (else an operator activated them). */
  'user.reactivated': { settled: boolean };
  'user.deleted': Record<string, never>;
  'wallet.credited': { transactionId: number; amount: bigint; balanceAfter: bigint; requestId: string };
  'wallet.debited': { transactionId: number; amount: bigint; balanceAfter: bigint; billingRecordId: number };
  'balance.low': { availableBalance: bigint; threshold: bigint };
  'balance.recovered': { availableBalance: bigint; threshold: bigint };
  'balance.depleted': { availableBalance: bigint };
  /** jobRunId: the billing run that created it; 0 for CreateBillingRecord. */
  'billing_record.created': { billingRecordId: number; amount: bigint; jobRunId: number };
  'billing_record.paid': { billingRecordId: number; amount: bigint; attemptCount: number };
  'billing_record.retry_scheduled': { billingRecordId: number; attemptCount: number; nextAttemptTime: Date; reason: string };
  'billing_record.failed': { billingRecordId: number; attemptCount: number; reason: string };
  'job_run.finished': { jobRunId: number; kind: string; status: string; errorMessage: string };
}

export type EventType = keyof EventPayloads;

export const EVENT_TYPES: readonly EventType[] = [
  'user.created',
  'user.suspended',
  'user.reactivated',
  'user.deleted',
  'wallet.credited',
  'wallet.debited',
  'balance.low',
  'balance.recovered',
  'balance.depleted',
  'billing_record.created',
  'billing_record.paid',
  'billing_record.retry_scheduled',
  'billing_record.failed',
  'job_run.finished',
];

/** An event to write, in the transaction of the change it describes. */
export type NewEvent = {
  [T in EventType]: {
    type: T;
    /** The user the change is about; 0 for job runs. */
    userId: number;
    /** The ledger row (wallet.*), billing record (billing_record.*) or job run (job_run.*) it is about; else null. */
    refId: number | null;
    payload: EventPayloads[T];
  };
}[EventType];

/** An event as committed: its id is its cursor. */
export type StoredEvent = NewEvent & { id: number; createdAt: Date };

/** Event cursors: the id, zero-padded to 16 digits, so they increase as strings of equal length too. */
export const cursorOf = (id: number): string => String(id).padStart(16, '0');
