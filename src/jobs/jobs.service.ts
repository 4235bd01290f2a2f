/**
 * Job bodies over the services, with every run recorded in job_runs. A run of
 * a kind already in progress in this process is joined, not started twice.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import type { BillingService } from '../billing/billing.types';
import { isTransientDbError, isUniqueViolation } from '../db/errors';
import type { Clock } from '../shared/clock';
import { pageOf, readPage } from '../shared/paging';
import { UsageFileUnusable, type IngestService } from '../usage/ingest.service';
import { JobRun, type JobCounts, type JobKind } from './job-run.entity';
import type { JobsService, JobTrigger } from './jobs.types';

export interface JobsDeps {
  /** The root entity manager; each run forks its own. */
  em: EntityManager;
  clock: Clock;
  log: Logger;
  ingest: IngestService;
  billing: BillingService;
}

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
  const { clock, log } = deps;
  const inFlight = new Map<JobKind, Promise<JobRun | null>>();

  async function processLogs(em: EntityManager, run: JobRun): Promise<void> {
    add(run, await deps.ingest.ingest(em, run.id));
  }

  /** Due retries, then the settlement sweep (unpaid records the wallet can pay now). */
  async function processRetries(em: EntityManager, run: JobRun): Promise<void> {
    add(run, await deps.billing.processDueRetries(em));
    add(run, await deps.billing.settleSweep(em));
  }

  async function execute(kind: JobKind, trigger: JobTrigger, periodKey: string | null = null): Promise<JobRun | null> {
    const em = deps.em.fork();
    const run = new JobRun(kind, trigger, clock.now());
    run.periodKey = periodKey;
    try {
      await em.persistAndFlush(run);
    } catch (err) {
      if (periodKey !== null && isUniqueViolation(err)) {
        log.info({ kind, periodKey }, 'period already claimed by another run; skipping');
        return null;
      }
      throw err;
    }
    try {
      if (kind === 'PROCESS_LOGS' || kind === 'PROCESS_ALL') await processLogs(em, run);
      if (kind === 'PROCESS_RETRIES' || kind === 'PROCESS_ALL') await processRetries(em, run);
      run.status = 'SUCCEEDED';
    } catch (err) {
      run.status = 'FAILED';
      const why = describe(err);
      run.errorMessage = run.errorMessage ? `${why}; ${run.errorMessage}` : why;
      if (err instanceof UsageFileUnusable) log.warn({ jobRunId: run.id, kind }, err.message);
      else log.error({ err, jobRunId: run.id, kind }, 'job run failed');
    }
    run.endedAt = clock.now();
    await em.flush();
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

    async closeInterruptedRuns() {
      const res = await deps.em.fork().execute<{ affectedRows: number }>(
        `update job_runs set status = 'FAILED', ended_at = ?, error_message = ? where status = 'RUNNING'`,
        [clock.now().getTime(), 'interrupted: the service stopped during this run (ingestion is all or nothing; records it created are charged by the retry scheduler)'],
        'run',
      );
      if (res.affectedRows > 0) log.warn({ runs: res.affectedRows }, 'closed job runs interrupted by a previous stop');
      return res.affectedRows;
    },

    async listRuns(em, pageReq) {
      const page = readPage(pageReq, {});
      const rows = await em.find(JobRun, { id: { $gt: page.afterId } }, { orderBy: { id: 'asc' }, limit: page.limit });
      return pageOf(rows, page);
    },
  };
  return service;
}

function countsOf(run: JobRun): JobCounts {
  const { entriesRead, entriesAccepted, entriesDuplicate, entriesRejected, entriesPending } = run;
  const { billingRecordsCreated, chargesSucceeded, retriesScheduled, recordsFailed, usersSuspended } = run;
  return {
    entriesRead,
    entriesAccepted,
    entriesDuplicate,
    entriesRejected,
    entriesPending,
    billingRecordsCreated,
    chargesSucceeded,
    retriesScheduled,
    recordsFailed,
    usersSuspended,
  };
}
