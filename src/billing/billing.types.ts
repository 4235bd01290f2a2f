import type { RecordView } from './records.repository';

export type { RecordView } from './records.repository';

export type ChargeOutcome = 'CHARGED' | 'ALREADY_PAID' | 'RETRY_SCHEDULED' | 'FAILED';

export interface ChargeResult extends RecordView {
  outcome: ChargeOutcome;
  /** True when this attempt suspended the user (the record became FAILED). */
  userSuspended: boolean;
}

export interface CreateRecordInput {
  userId: number;
  amount: bigint;
  description: string;
  requestId: string;
}

/** What charge attempts did, as job runs count it. */
export interface RetryCounts {
  chargesSucceeded: number;
  retriesScheduled: number;
  recordsFailed: number;
  usersSuspended: number;
}
