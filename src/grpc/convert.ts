/**
 * Translation between domain values and protobuf messages, both ways.
 *
 * Out: ids become bigint (a missing id is 0), money goes through
 * microsToMoney, quantities are exact decimal strings, missing instants are
 * left unset. In: enum numbers the service does not know are rejected with
 * INVALID_ENUM, and *_UNSPECIFIED filters mean "any" (null).
 */
import type { RecordView, ChargeOutcome } from '../billing/billing.types';
import type { BillingRecordStatus, LineItem } from '../billing/billing-record.entity';
import type { JobKind, JobRun, JobRunStatus } from '../jobs/job-run.entity';
import { invalidArgument } from '../shared/errors';
import { toId } from '../shared/ids';
import { formatDecimal, microsToMoney, QUANTITY_SCALE } from '../shared/money';
import type { PageRequest } from '../shared/paging';
import type { UsageLog, UsageLogStatus, UsageSource } from '../usage/usage-log.entity';
import type { SummaryGroupBy, UsageEventResult, UsageEventStatus, UsageSummaryRow } from '../usage/usage.service';
import type { User, UserStatus } from '../users/user.entity';
import type { WalletTransaction, WalletTransactionType } from '../wallets/wallet.entity';
import type { BalanceAlertView, WalletWithAvailable } from '../wallets/wallets.service';
import { cursorOf, type StoredEvent } from '../events/events.types';
import * as billingPb from '../../generated/billing/v1/billing_service';
import type * as eventPb from '../../generated/billing/v1/event_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import type * as moneyPb from '../../generated/billing/v1/money';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';

const pbId = (id: number | null): bigint => (id === null ? 0n : BigInt(id));
const pbTime = (at: Date | null): Date | undefined => at ?? undefined;

export function money(micros: bigint, currency: string): moneyPb.Money {
  return microsToMoney(micros, currency);
}

export const quantityToPb = (quantity: bigint): string => formatDecimal(quantity, QUANTITY_SCALE);

// ---- enums, domain -> protobuf -------------------------------------------

const USER_STATUS: Record<UserStatus, userPb.UserStatus> = {
  ACTIVE: userPb.UserStatus.USER_STATUS_ACTIVE,
  SUSPENDED: userPb.UserStatus.USER_STATUS_SUSPENDED,
};

const TRANSACTION_TYPE: Record<WalletTransactionType, walletPb.WalletTransactionType> = {
  CREDIT: walletPb.WalletTransactionType.WALLET_TRANSACTION_TYPE_CREDIT,
  DEBIT: walletPb.WalletTransactionType.WALLET_TRANSACTION_TYPE_DEBIT,
};

const RECORD_STATUS: Record<BillingRecordStatus, billingPb.BillingRecordStatus> = {
  PENDING: billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PENDING,
  PAID: billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID,
  FAILED: billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_FAILED,
};

const CHARGE_OUTCOME: Record<ChargeOutcome, billingPb.ChargeOutcome> = {
  CHARGED: billingPb.ChargeOutcome.CHARGE_OUTCOME_CHARGED,
  ALREADY_PAID: billingPb.ChargeOutcome.CHARGE_OUTCOME_ALREADY_PAID,
  RETRY_SCHEDULED: billingPb.ChargeOutcome.CHARGE_OUTCOME_RETRY_SCHEDULED,
  FAILED: billingPb.ChargeOutcome.CHARGE_OUTCOME_FAILED,
};

const USAGE_STATUS: Record<UsageLogStatus, billingPb.UsageLogStatus> = {
  PENDING: billingPb.UsageLogStatus.USAGE_LOG_STATUS_PENDING,
  BILLED: billingPb.UsageLogStatus.USAGE_LOG_STATUS_BILLED,
  REJECTED: billingPb.UsageLogStatus.USAGE_LOG_STATUS_REJECTED,
};

const USAGE_SOURCE: Record<UsageSource, billingPb.UsageSource> = {
  FILE: billingPb.UsageSource.USAGE_SOURCE_FILE,
  API: billingPb.UsageSource.USAGE_SOURCE_API,
};

const EVENT_STATUS: Record<UsageEventStatus, usagePb.UsageEventStatus> = {
  ACCEPTED: usagePb.UsageEventStatus.USAGE_EVENT_STATUS_ACCEPTED,
  DUPLICATE: usagePb.UsageEventStatus.USAGE_EVENT_STATUS_DUPLICATE,
  CONFLICT: usagePb.UsageEventStatus.USAGE_EVENT_STATUS_CONFLICT,
  REJECTED: usagePb.UsageEventStatus.USAGE_EVENT_STATUS_REJECTED,
  PENDING: usagePb.UsageEventStatus.USAGE_EVENT_STATUS_PENDING,
};

const GROUP_BY: Record<SummaryGroupBy, usagePb.UsageSummaryGroupBy> = {
  SERVICE: usagePb.UsageSummaryGroupBy.USAGE_SUMMARY_GROUP_BY_SERVICE,
  HOUR: usagePb.UsageSummaryGroupBy.USAGE_SUMMARY_GROUP_BY_HOUR,
  DAY: usagePb.UsageSummaryGroupBy.USAGE_SUMMARY_GROUP_BY_DAY,
};

const JOB_KIND: Record<JobKind, jobPb.JobKind> = {
  PROCESS_LOGS: jobPb.JobKind.JOB_KIND_PROCESS_LOGS,
  PROCESS_RETRIES: jobPb.JobKind.JOB_KIND_PROCESS_RETRIES,
  PROCESS_ALL: jobPb.JobKind.JOB_KIND_PROCESS_ALL,
};

const JOB_STATUS: Record<JobRunStatus, jobPb.JobRunStatus> = {
  RUNNING: jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING,
  SUCCEEDED: jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED,
  FAILED: jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED,
};

export const chargeOutcomeToPb = (outcome: ChargeOutcome): billingPb.ChargeOutcome => CHARGE_OUTCOME[outcome];

// ---- messages, domain -> protobuf ----------------------------------------

export function userToPb(user: User): userPb.User {
  return {
    id: pbId(user.id),
    email: user.email,
    name: user.name,
    status: USER_STATUS[user.status],
    suspensionReason: user.suspensionReason,
    createTime: pbTime(user.createdAt),
    updateTime: pbTime(user.updatedAt),
  };
}

export function walletToPb(wallet: WalletWithAvailable, currency: string): walletPb.Wallet {
  return {
    userId: pbId(wallet.userId),
    balance: money(wallet.balance, currency),
    createTime: pbTime(wallet.createdAt),
    updateTime: pbTime(wallet.updatedAt),
    availableBalance: money(wallet.available, currency),
  };
}

const ALERT_STATE: Record<BalanceAlertView['state'], walletPb.BalanceAlertState> = {
  OK: walletPb.BalanceAlertState.BALANCE_ALERT_STATE_OK,
  LOW: walletPb.BalanceAlertState.BALANCE_ALERT_STATE_LOW,
  DEPLETED: walletPb.BalanceAlertState.BALANCE_ALERT_STATE_DEPLETED,
};

export function balanceAlertToPb(alert: BalanceAlertView, currency: string): walletPb.BalanceAlert {
  return {
    userId: BigInt(alert.userId),
    threshold: money(alert.threshold, currency),
    isDefault: alert.isDefault,
    state: ALERT_STATE[alert.state],
    availableBalance: money(alert.available, currency),
  };
}

export function walletTransactionToPb(t: WalletTransaction, currency: string): walletPb.WalletTransaction {
  return {
    id: pbId(t.id),
    userId: pbId(t.userId),
    type: TRANSACTION_TYPE[t.type],
    amount: money(t.amount, currency),
    balanceAfter: money(t.balanceAfter, currency),
    billingRecordId: pbId(t.billingRecordId),
    requestId: t.requestId ?? '',
    createTime: pbTime(t.createdAt),
  };
}

export function lineItemToPb(item: LineItem, currency: string): billingPb.LineItem {
  return {
    service: item.service,
    quantity: quantityToPb(item.quantity),
    unitPrice: money(item.unitPrice, currency),
    amount: money(item.amount, currency),
  };
}

export function billingRecordToPb(view: RecordView, currency: string): billingPb.BillingRecord {
  const { record, lineItems } = view;
  return {
    id: pbId(record.id),
    userId: pbId(record.userId),
    amount: money(record.amount, currency),
    status: RECORD_STATUS[record.status],
    description: record.description,
    lineItems: lineItems.map((item) => lineItemToPb(item, currency)),
    attemptCount: record.attemptCount,
    nextAttemptTime: pbTime(record.nextAttemptAt),
    failureReason: record.failureReason,
    createTime: pbTime(record.createdAt),
    updateTime: pbTime(record.updatedAt),
    paidTime: pbTime(record.paidAt),
  };
}

export function usageLogToPb(log: UsageLog): billingPb.UsageLog {
  return {
    id: pbId(log.id),
    userId: pbId(log.userId),
    service: log.service,
    quantity: quantityToPb(log.quantity),
    timestamp: pbTime(log.usageAt),
    status: USAGE_STATUS[log.status],
    reason: log.reason,
    billingRecordId: pbId(log.billingRecordId),
    ingestTime: pbTime(log.ingestedAt),
    source: USAGE_SOURCE[log.source],
    eventId: log.dedupKey.startsWith('e:') ? log.dedupKey.slice(2) : '',
  };
}

export const usageEventResultToPb = (r: UsageEventResult): usagePb.UsageEventResult => ({
  status: EVENT_STATUS[r.status],
  usageId: pbId(r.usageId),
  reason: r.reason,
  message: r.message,
});

export const usageSummaryRowToPb = (r: UsageSummaryRow, currency: string): usagePb.UsageSummaryRow => ({
  service: r.service,
  periodStart: r.periodStart,
  quantity: quantityToPb(r.quantity),
  amount: money(r.amount, currency),
  entries: BigInt(r.entries),
});

export function jobRunToPb(run: JobRun): jobPb.JobRun {
  return {
    id: pbId(run.id),
    kind: JOB_KIND[run.kind],
    status: JOB_STATUS[run.status],
    trigger: run.trigger,
    startTime: pbTime(run.startedAt),
    endTime: pbTime(run.endedAt),
    entriesRead: BigInt(run.entriesRead),
    entriesAccepted: BigInt(run.entriesAccepted),
    entriesDuplicate: BigInt(run.entriesDuplicate),
    entriesConflict: BigInt(run.entriesConflict),
    entriesRejected: BigInt(run.entriesRejected),
    entriesPending: BigInt(run.entriesPending),
    billingRecordsCreated: BigInt(run.billingRecordsCreated),
    chargesSucceeded: BigInt(run.chargesSucceeded),
    retriesScheduled: BigInt(run.retriesScheduled),
    recordsFailed: BigInt(run.recordsFailed),
    usersSuspended: BigInt(run.usersSuspended),
    errorMessage: run.errorMessage,
  };
}

// ---- requests, protobuf -> domain ----------------------------------------

/**
 * Reads an enum filter: UNSPECIFIED (0) is "any" (null); a number the table
 * does not know (from a newer client, or garbage) is INVALID_ENUM.
 */
function enumFilter<D extends string>(value: number, table: Record<D, number>, field: string): D | null {
  if (value === 0) return null;
  for (const [domain, wire] of Object.entries(table) as [D, number][]) {
    if (wire === value) return domain;
  }
  throw invalidArgument(field, 'INVALID_ENUM', `${field} has an unknown value ${value}`);
}

export const parseUserStatusFilter = (value: userPb.UserStatus, field = 'status'): UserStatus | null =>
  enumFilter(value, USER_STATUS, field);

export const parseBillingRecordStatusFilter = (
  value: billingPb.BillingRecordStatus,
  field = 'status',
): BillingRecordStatus | null => enumFilter(value, RECORD_STATUS, field);

export const parseUsageLogStatusFilter = (value: billingPb.UsageLogStatus, field = 'status'): UsageLogStatus | null =>
  enumFilter(value, USAGE_STATUS, field);

export const parseUsageSourceFilter = (value: billingPb.UsageSource, field = 'source'): UsageSource | null =>
  enumFilter(value, USAGE_SOURCE, field);

/** group_by: UNSPECIFIED groups by service. */
export const parseGroupBy = (value: usagePb.UsageSummaryGroupBy): SummaryGroupBy => enumFilter(value, GROUP_BY, 'group_by') ?? 'SERVICE';

/** A user_id filter: 0 means every user (null), anything else must be a valid id. */
export const userIdFilter = (value: bigint, field = 'user_id'): number | null => (value === 0n ? null : toId(value, field));

/** page_size / page_token as the domain's PageRequest (paging.ts validates them). */
export const pageRequest = (req: { pageSize: number; pageToken: string }): PageRequest => ({
  pageSize: req.pageSize,
  pageToken: req.pageToken,
});

// ---- events -----------------------------------------------------------------

/** The oneof of an event: one payload field per type, money through microsToMoney. */
function eventPayloadToPb(e: StoredEvent, currency: string): eventPb.Event['payload'] {
  const m = (micros: bigint) => money(micros, currency);
  switch (e.type) {
    case 'user.created':
      return { $case: 'userCreated', value: { name: e.payload.name, email: e.payload.email } };
    case 'user.suspended':
      return { $case: 'userSuspended', value: { reason: e.payload.reason, billingRecordId: BigInt(e.payload.billingRecordId) } };
    case 'user.reactivated':
      return { $case: 'userReactivated', value: { settled: e.payload.settled } };
    case 'user.deleted':
      return { $case: 'userDeleted', value: {} };
    case 'wallet.credited': {
      const p = e.payload;
      return {
        $case: 'walletCredited',
        value: { transactionId: BigInt(p.transactionId), amount: m(p.amount), balanceAfter: m(p.balanceAfter), requestId: p.requestId },
      };
    }
    case 'wallet.debited': {
      const p = e.payload;
      return {
        $case: 'walletDebited',
        value: {
          transactionId: BigInt(p.transactionId),
          amount: m(p.amount),
          balanceAfter: m(p.balanceAfter),
          billingRecordId: BigInt(p.billingRecordId),
        },
      };
    }
    case 'balance.low':
      return { $case: 'balanceLow', value: { availableBalance: m(e.payload.availableBalance), threshold: m(e.payload.threshold) } };
    case 'balance.recovered':
      return { $case: 'balanceRecovered', value: { availableBalance: m(e.payload.availableBalance), threshold: m(e.payload.threshold) } };
    case 'balance.depleted':
      return { $case: 'balanceDepleted', value: { availableBalance: m(e.payload.availableBalance) } };
    case 'billing_record.created': {
      const p = e.payload;
      return { $case: 'billingRecordCreated', value: { billingRecordId: BigInt(p.billingRecordId), amount: m(p.amount), jobRunId: BigInt(p.jobRunId) } };
    }
    case 'billing_record.paid': {
      const p = e.payload;
      return { $case: 'billingRecordPaid', value: { billingRecordId: BigInt(p.billingRecordId), amount: m(p.amount), attemptCount: p.attemptCount } };
    }
    case 'billing_record.retry_scheduled': {
      const p = e.payload;
      return {
        $case: 'billingRecordRetryScheduled',
        value: { billingRecordId: BigInt(p.billingRecordId), attemptCount: p.attemptCount, nextAttemptTime: p.nextAttemptTime, reason: p.reason },
      };
    }
    case 'billing_record.failed': {
      const p = e.payload;
      return { $case: 'billingRecordFailed', value: { billingRecordId: BigInt(p.billingRecordId), attemptCount: p.attemptCount, reason: p.reason } };
    }
    case 'job_run.finished': {
      const p = e.payload;
      return { $case: 'jobRunFinished', value: { jobRunId: BigInt(p.jobRunId), kind: p.kind, status: p.status, errorMessage: p.errorMessage } };
    }
  }
}

export function eventToPb(e: StoredEvent, currency: string): eventPb.Event {
  return { cursor: cursorOf(e.id), type: e.type, userId: BigInt(e.userId), time: e.createdAt, payload: eventPayloadToPb(e, currency) };
}
