/**
 * The Prometheus side of ../shared/metrics.ts, on a prom-client Registry built
 * at start-up by the composition root (never prom-client's global registry):
 *
 *   billing_rpc_calls_total{method, code}               unary RPCs answered, refused ones included
 *   billing_rpc_duration_seconds{method, code}          histogram of the same calls
 *   billing_usage_entries_total{outcome, source}        billed | accepted | pending | rejected | duplicate | conflict; file | api
 *   billing_charge_attempts_total{outcome, trigger}     charged | retry_scheduled | failed; new | manual | retry | settle
 *   billing_users_suspended_total                       users suspended for non-payment
 *   billing_job_run_duration_seconds{kind, status}      histogram of finished job runs
 *   billing_retries_pending                             PENDING records waiting for a retry, read at scrape time
 *   billing_event_watchers                              WatchEvents streams open on this replica
 *   billing_event_delivery_lag_seconds                  histogram: from an event's commit to its send to a watcher
 *
 * plus prom-client's default process and Node.js metrics (process_*, nodejs_*)
 * under their usual names, so that stock dashboards find them.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Logger } from 'pino';
import type { ChargeAttemptOutcome, ChargeAttemptTrigger, Metrics, UsageEntryCounts, UsageSource } from '../shared/metrics';

export interface PrometheusMetricsDeps {
  log: Logger;
  /**
   * PENDING records with a retry scheduled, as the database says now
   * (BillingRecordsRepository.countPendingRetries). Called on every scrape.
   */
  countPendingRetries: () => Promise<number>;
}

export interface PrometheusMetrics extends Metrics {
  readonly registry: Registry;
}

const CHARGE_OUTCOMES: readonly ChargeAttemptOutcome[] = ['CHARGED', 'RETRY_SCHEDULED', 'FAILED'];
const CHARGE_TRIGGERS: readonly ChargeAttemptTrigger[] = ['new', 'manual', 'retry', 'settle'];
const USAGE_OUTCOMES: readonly (keyof UsageEntryCounts)[] = ['billed', 'accepted', 'pending', 'rejected', 'duplicate', 'conflict'];
const USAGE_SOURCES: readonly UsageSource[] = ['file', 'api'];

/** RPC latency buckets (seconds): from a cached read to a charge that waited for the writer. */
const RPC_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** Event delivery lag buckets (seconds): from one poll interval to a watcher reading old history. */
const LAG_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600, 86400];
/** Job run buckets (seconds): from an empty retry pass to a large usage file. */
const JOB_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600];

export function createPrometheusMetrics(deps: PrometheusMetricsDeps): PrometheusMetrics {
  const { log, countPendingRetries } = deps;
  const registry = new Registry();
  const registers = [registry];
  collectDefaultMetrics({ register: registry });

  const rpcCalls = new Counter({
    name: 'billing_rpc_calls_total',
    help: 'Unary RPCs of the billing services answered, by method and gRPC status code (calls refused by authentication included).',
    labelNames: ['method', 'code'] as const,
    registers,
  });
  const rpcDuration = new Histogram({
    name: 'billing_rpc_duration_seconds',
    help: 'Time from the start of a unary RPC to its answer, by method and gRPC status code.',
    labelNames: ['method', 'code'] as const,
    buckets: RPC_BUCKETS,
    registers,
  });
  const usageEntries = new Counter({
    name: 'billing_usage_entries_total',
    help: 'Usage entries of sealed ingestion runs (file) and committed RecordUsage/StreamUsage batches (api), by what became of them.',
    labelNames: ['outcome', 'source'] as const,
    registers,
  });
  const chargeAttempts = new Counter({
    name: 'billing_charge_attempts_total',
    help: 'Committed charge attempts, by outcome (charged, retry_scheduled, failed) and trigger (new, manual, retry, settle).',
    labelNames: ['outcome', 'trigger'] as const,
    registers,
  });
  const usersSuspended = new Counter({
    name: 'billing_users_suspended_total',
    help: 'Users suspended for non-payment (a record failed after its last retry).',
    registers,
  });
  const jobRunDuration = new Histogram({
    name: 'billing_job_run_duration_seconds',
    help: 'Duration of finished job runs, by kind (PROCESS_LOGS, PROCESS_RETRIES, PROCESS_ALL) and status (SUCCEEDED, FAILED).',
    labelNames: ['kind', 'status'] as const,
    buckets: JOB_BUCKETS,
    registers,
  });
  const eventWatchers = new Gauge({
    name: 'billing_event_watchers',
    help: 'WatchEvents streams open on this replica.',
    registers,
  });
  const eventLag = new Histogram({
    name: 'billing_event_delivery_lag_seconds',
    help: 'Time from an event\'s commit (its time stamp) to its send to a WatchEvents stream; history read late counts its age.',
    buckets: LAG_BUCKETS,
    registers,
  });
  new Gauge({
    name: 'billing_retries_pending',
    help: 'Billing records PENDING with a retry scheduled, read from the database at scrape time (NaN when the read failed).',
    registers,
    async collect() {
      try {
        this.set(await countPendingRetries());
      } catch (err) {
        log.warn({ err }, 'metrics: could not count the pending retries');
        this.set(Number.NaN);
      }
    },
  });

  // Every combination of the fixed labels exists from the start, at 0, so rate() sees the first increment.
  for (const outcome of CHARGE_OUTCOMES) {
    for (const trigger of CHARGE_TRIGGERS) chargeAttempts.inc({ outcome: outcome.toLowerCase(), trigger }, 0);
  }
  for (const outcome of USAGE_OUTCOMES) {
    for (const source of USAGE_SOURCES) usageEntries.inc({ outcome, source }, 0);
  }

  return {
    registry,
    rpcFinished(method, code, seconds) {
      rpcCalls.inc({ method, code });
      rpcDuration.observe({ method, code }, seconds);
    },
    chargeAttempted(outcome, trigger) {
      chargeAttempts.inc({ outcome: outcome.toLowerCase(), trigger });
    },
    userSuspended() {
      usersSuspended.inc();
    },
    usageEntriesStored(counts, source) {
      for (const outcome of USAGE_OUTCOMES) {
        if (counts[outcome] > 0) usageEntries.inc({ outcome, source }, counts[outcome]);
      }
    },
    jobRunFinished(kind, status, seconds) {
      jobRunDuration.observe({ kind, status }, seconds);
    },
    eventWatchers(open) {
      eventWatchers.set(open);
    },
    eventSent(lagSeconds) {
      eventLag.observe(Math.max(0, lagSeconds));
    },
  };
}
