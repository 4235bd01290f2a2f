/**
 * Job bodies over the services, with every run recorded in job_runs (through
 * ./job-runs.repository.ts). A run of a kind already in progress in this
 * process is joined, not started twice.
 */
import type { Logger } from 'pino';
import type { Database } from '../db/database';
import type { BillingService } from '../billing/billing.service';
import { isTransientDbError } from '../db/errors';
import type { Clock } from '../shared/clock';
import { noMetrics, type Metrics } from '../shared/metrics';
import { readPage } from '../shared/paging';
import { UsageFileUnusable, type IngestService } from '../usage/ingest';
import { countsOf, type JobCounts, type JobKind, type JobRun } from './job-run.entity';
import type { JobRunsRepository } from './job-runs.repository';
import type { JobsService, JobTrigger } from './jobs.types';

export interface JobsDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  jobRuns: JobRunsRepository;
  ingest: IngestService;
  billing: Pick<BillingService, 'processDueRetries' | 'settleSweep'>;
  /**
   * A RUNNING run's lease (default 60 s): its process renews heartbeat_at every
   * quarter of it, and any process closes a run of another process whose
   * heartbeat is older than this (its owner died or lost the database).
   */
  leaseMs?: number;
  /** Told how long each finished run took, by kind and status (default: nobody). */
  metrics?: Metrics;
}

/** How long closing a run keeps trying while the database is away, before the lease takes over. */
const CLOSE_RETRY_DELAYS_MS = [100, 250, 500, 1000, 2000, 4000, 8000];

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

type CountsDelta = { [K in keyof JobCounts]?: number } & { notice?: string };

function add(run: JobRun, counts: CountsDelta): void {
  for (const key of Object.keys(counts) as (keyof JobCounts | 'notice')[]) {
    if (key === 'notice') continue;
    run[key] += counts[key] ?? 0;
  }
  if (counts.notice) run.errorMessage = run.errorMessage ? `${run.errorMessage}; ${counts.notice}` : counts.notice;
}

/** What an operator may read about a failed run (no SQL or stack). */
function describe(err: unknown): string {
  if (err instanceof UsageFileUnusable) return err.message;
  if (isTransientDbError(err)) return 'database unavailable; the run will be retried by the next trigger';
  return `internal error (${(err as Error)?.name ?? 'Error'}); see the service log`;
}

export function createJobsService(deps: JobsDeps): JobsService {
  const { db, clock, log, jobRuns } = deps;
  const leaseMs = deps.leaseMs ?? 60_000;
  const metrics = deps.metrics ?? noMetrics;
  const inFlight = new Map<JobKind, Promise<JobRun | null>>();
  /** Runs this process is executing: never reaped here, whatever their heartbeat says. */
  const mine = new Set<number>();
  let reaper: NodeJS.Timeout | null = null;
  let reaping: Promise<unknown> = Promise.resolve();

  /** Renews the run's lease until stopped; a failed renewal is logged and tried again at the next beat. */
  function heartbeat(runId: number): () => void {
    let busy = false;
    const timer = setInterval(() => {
      if (busy) return;
      busy = true;
      jobRuns
        .heartbeat(runId, clock.now())
        .catch((err: unknown) => log.warn({ err, jobRunId: runId }, 'job run heartbeat failed'))
        .finally(() => (busy = false));
    }, Math.max(10, Math.floor(leaseMs / 4)));
    timer.unref();
    return () => clearInterval(timer);
  }

  /**
   * Writes the run's outcome, trying again while the database is away (a
   * restart, say). If it never comes back in time the heartbeat stops with
   * this process's work and another process's reaper closes the run.
   */
  async function close(run: JobRun): Promise<void> {
    const { id, status } = run;
    for (let attempt = 0; ; attempt++) {
      try {
        await jobRuns.close(run);
        return;
      } catch (err) {
        if (!isTransientDbError(err) || attempt >= CLOSE_RETRY_DELAYS_MS.length) {
          log.error({ err, jobRunId: id, status }, 'could not record the end of a job run; its lease will close it');
          return;
        }
        await sleep(CLOSE_RETRY_DELAYS_MS[attempt]);
      }
    }
  }

  async function processLogs(run: JobRun): Promise<void> {
    add(run, await deps.ingest.ingest(run.id));
  }

  /** Due retries, then the settlement sweep (unpaid records the wallet can pay now). */
  async function processRetries(run: JobRun): Promise<void> {
    add(run, await deps.billing.processDueRetries(db.fork()));
    add(run, await deps.billing.settleSweep());
  }

  async function execute(kind: JobKind, trigger: JobTrigger, periodKey: string | null = null): Promise<JobRun | null> {
    const run = await jobRuns.claim(kind, trigger, periodKey, clock.now());
    if (!run) {
      log.info({ kind, periodKey }, 'period already claimed by another run; skipping');
      return null;
    }
    mine.add(run.id);
    // Wall time, not the (injectable) clock: how long the run really took.
    const started = performance.now();
    const stopHeartbeat = heartbeat(run.id);
    try {
      if (kind === 'PROCESS_LOGS' || kind === 'PROCESS_ALL') await processLogs(run);
      if (kind === 'PROCESS_RETRIES' || kind === 'PROCESS_ALL') await processRetries(run);
      run.status = 'SUCCEEDED';
    } catch (err) {
      run.status = 'FAILED';
      const why = describe(err);
      run.errorMessage = run.errorMessage ? `${why}; ${run.errorMessage}` : why;
      if (err instanceof UsageFileUnusable) log.warn({ jobRunId: run.id, kind }, err.message);
      else log.error({ err, jobRunId: run.id, kind }, 'job run failed');
    }
    run.endedAt = clock.now();
    run.heartbeatAt = null;
    try {
      await close(run);
    } finally {
      stopHeartbeat();
      mine.delete(run.id);
    }
    metrics.jobRunFinished(run.kind, run.status, (performance.now() - started) / 1000);
    log.info({ jobRunId: run.id, kind, trigger, status: run.status, ...countsOf(run) }, 'job run finished');
    return run;
  }

  /** Starts a run and makes it the one of its kind in progress here until it settles. */
  function start(kind: JobKind, body: () => Promise<JobRun | null>): Promise<JobRun | null> {
    const promise = body().finally(() => {
      if (inFlight.get(kind) === promise) inFlight.delete(kind);
    });
    inFlight.set(kind, promise);
    return promise;
  }

  const service: JobsService = {
    run(kind, trigger) {
      // Join a run of the same kind in progress here (registration is synchronous, so simultaneous triggers share
      // one run); if that was a scheduled tick another replica had already claimed, run now instead.
      const current = inFlight.get(kind);
      if (!current) return start(kind, () => execute(kind, trigger)) as Promise<JobRun>;
      return current.then((run) => run ?? service.run(kind, trigger));
    },

    runForPeriod(kind, periodKey) {
      // A run of this kind in progress here does the same work: let it finish, then claim the tick.
      const before = inFlight.get(kind)?.catch(() => null);
      return start(kind, async () => {
        await before;
        return execute(kind, 'cron', periodKey);
      });
    },

    async reapAbandonedRuns() {
      const now = clock.now();
      const closed = await jobRuns.reapExpired(
        new Date(now.getTime() - leaseMs),
        mine,
        now,
        `abandoned: no heartbeat for over ${Math.round(leaseMs / 1000)} s (its process died or lost the database); ingestion is all or nothing, and records it created are charged by the retry scheduler`,
      );
      if (closed > 0) log.warn({ runs: closed }, 'closed job runs whose process stopped renewing their lease');
      return closed;
    },

    startReaper() {
      if (reaper) return;
      const tick = () => {
        reaping = service.reapAbandonedRuns().catch((err: unknown) => log.warn({ err }, 'reaping abandoned job runs failed'));
      };
      reaper = setInterval(tick, Math.max(10, Math.floor(leaseMs / 2)));
      reaper.unref();
      tick();
    },

    async stopReaper() {
      if (reaper) clearInterval(reaper);
      reaper = null;
      await reaping;
    },

    async closeInterruptedRuns() {
      const closed = await jobRuns.closeAllRunning(
        clock.now(),
        'interrupted: the service stopped during this run (ingestion is all or nothing; records it created are charged by the retry scheduler)',
      );
      if (closed > 0) log.warn({ runs: closed }, 'closed job runs interrupted by a previous stop');
      return closed;
    },

    listRuns: (pageReq) => jobRuns.list(readPage(pageReq, {})),
  };
  return service;
}
