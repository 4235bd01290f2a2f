import type { EntityManager } from '@mikro-orm/knex';
import type { PageRequest } from '../shared/paging';
import type { UsageLog, UsageLogStatus } from '../usage/usage-log.entity';
import type { BillingRecord, BillingRecordStatus, LineItem } from './billing-record.entity';

export type ChargeOutcome = 'CHARGED' | 'ALREADY_PAID' | 'RETRY_SCHEDULED' | 'FAILED';

export interface RecordView {
  record: BillingRecord;
  lineItems: LineItem[];
}

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

export interface RetryCounts {
  chargesSucceeded: number;
  retriesScheduled: number;
  recordsFailed: number;
  usersSuspended: number;
}

export interface BillingService {
  /** Creates a MANUAL record and charges it at once. */
  createManualRecord(em: EntityManager, input: CreateRecordInput): Promise<ChargeResult>;
  getRecord(em: EntityManager, id: number): Promise<RecordView>;
  listRecords(
    em: EntityManager,
    filter: { userId: number | null; status: BillingRecordStatus | null },
    page: PageRequest,
  ): Promise<{ items: RecordView[]; nextPageToken: string }>;
  /** ProcessBillingRecord: charge now whatever the schedule says (PAID is ALREADY_PAID). */
  processRecord(em: EntityManager, id: number): Promise<ChargeResult>;
  listUsageLogs(
    em: EntityManager,
    filter: { userId: number | null; status: UsageLogStatus | null },
    page: PageRequest,
  ): Promise<{ items: UsageLog[]; nextPageToken: string }>;
  /** Charges a user's unpaid records oldest first; reactivates a user suspended for non-payment once none is left. */
  settleUser(em: EntityManager, userId: number): Promise<{ counts: RetryCounts; paidRecordIds: number[] }>;
  /**
   * Settles every user with an unpaid record that their wallet can pay now
   * (what a failed settlement after a top-up left behind); not an attempt.
   */
  settleSweep(em: EntityManager): Promise<RetryCounts>;
  /** True when settleSweep has something to settle. */
  hasSettleable(em: EntityManager): Promise<boolean>;
  /** Charges records just created (their first attempt). */
  chargeNewRecords(em: EntityManager, ids: readonly number[]): Promise<RetryCounts>;
  /** Charges every PENDING record whose retry is due at `now`. */
  processDueRetries(em: EntityManager): Promise<RetryCounts>;
  /** When the earliest scheduled retry is due, or null when none is. */
  nextDueTime(em: EntityManager): Promise<Date | null>;
}
