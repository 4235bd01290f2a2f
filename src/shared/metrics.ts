/**
 * What the service tells its metrics, as plain calls: the domain, the jobs and
 * the gRPC layer call these and never see a metrics library. The Prometheus
 * implementation is ../ops/metrics.ts (built by the composition root only when
 * METRICS_PORT is set); otherwise every call goes to `noMetrics`.
 *
 * Callers report only what has committed: a charge attempt after its
 * transaction, usage entries after their run sealed, a job run once it ended.
 */

/** A charge attempt that moved a record: paid, a retry scheduled, or FAILED for good. */
export type ChargeAttemptOutcome = 'CHARGED' | 'RETRY_SCHEDULED' | 'FAILED';

/** What started a charge attempt (see ../billing/charge-decision.ts). */
export type ChargeAttemptTrigger = 'new' | 'manual' | 'retry' | 'settle';

/** Where usage entries came from: the usage log file, or UsageService (RecordUsage, StreamUsage). */
export type UsageSource = 'file' | 'api';

/** New entries of one ingestion run or one recorded batch, by what became of them when they were stored. */
export interface UsageEntryCounts {
  /** Stored BILLED, on a record of this run (file). */
  billed: number;
  /** Stored, billable, to be billed by the next billing run (api: ACCEPTED). */
  accepted: number;
  /** Valid but stored PENDING (unknown user, no price, over the record limit). */
  pending: number;
  /** Invalid: stored REJECTED (file) or answered REJECTED and not stored (api). */
  rejected: number;
  /** Recorded before with the same content: nothing stored. */
  duplicate: number;
  /** Their id was recorded before with other content: nothing stored, the first stands. */
  conflict: number;
}

export interface Metrics {
  /** A unary RPC answered with `code` (the gRPC status name, e.g. 'OK') after `seconds`; refused calls too. */
  rpcFinished(method: string, code: string, seconds: number): void;
  /** One committed charge attempt. */
  chargeAttempted(outcome: ChargeAttemptOutcome, trigger: ChargeAttemptTrigger): void;
  /** A user suspended for non-payment (committed). */
  userSuspended(): void;
  /** The entries of a sealed ingestion run, or of a committed batch of recorded usage. */
  usageEntriesStored(counts: UsageEntryCounts, source: UsageSource): void;
  /** A job run ended (and was recorded) with `status` after `seconds`. */
  jobRunFinished(kind: string, status: string, seconds: number): void;
  /** WatchEvents streams open on this replica, now. */
  eventWatchers(open: number): void;
  /** One event handed to a watcher, `lagSeconds` after it was committed (its time stamp). */
  eventSent(lagSeconds: number): void;
}

/** Metrics off: every report is dropped. */
export const noMetrics: Metrics = Object.freeze({
  rpcFinished: () => undefined,
  chargeAttempted: () => undefined,
  userSuspended: () => undefined,
  usageEntriesStored: () => undefined,
  jobRunFinished: () => undefined,
  eventWatchers: () => undefined,
  eventSent: () => undefined,
});
