/**
 * The door of the `job_runs` table: a run is claimed (inserted RUNNING, with
 * its period for scheduled runs), renews its lease while it works, and is
 * closed once, as SUCCEEDED or FAILED, by its process or by another process
 * once its lease ran out.
 */
import type { Database } from '../db/database';
import { isUniqueViolation } from '../db/errors';
import { pageOf, type Page } from '../shared/paging';
import { countsOf, JobRun, type JobKind } from './job-run.entity';
import type { JobTrigger } from './jobs.types';

export interface JobRunsRepository {
  /** Inserts a RUNNING run; null when `periodKey` is already claimed (by any replica). */
  claim(kind: JobKind, trigger: JobTrigger, periodKey: string | null, now: Date): Promise<JobRun | null>;
  /** Renews the lease of a run still RUNNING. */
  heartbeat(id: number, now: Date): Promise<void>;
  /** Writes a run's outcome and counts, if it is still RUNNING (a reaper may have closed it). */
  close(run: JobRun): Promise<void>;
  /** Closes as FAILED every RUNNING run (but `exclude`) whose lease ended before `before`; returns how many. */
  reapExpired(before: Date, exclude: ReadonlySet<number>, now: Date, message: string): Promise<number>;
  /** Closes as FAILED every RUNNING run: for a database one process owns, at its start. */
  closeAllRunning(now: Date, message: string): Promise<number>;
  list(page: Page): Promise<{ items: JobRun[]; nextPageToken: string }>;
}

export function createJobRunsRepository(db: Database): JobRunsRepository {
  return {
    async claim(kind, trigger, periodKey, now) {
      const run = new JobRun(kind, trigger, now);
      run.periodKey = periodKey;
      run.heartbeatAt = now;
      try {
        await db.fork().persistAndFlush(run);
      } catch (err) {
        if (periodKey !== null && isUniqueViolation(err)) return null;
        throw err;
      }
      return run;
    },

    async heartbeat(id, now) {
      await db.fork().nativeUpdate(JobRun, { id, status: 'RUNNING' }, { heartbeatAt: now });
    },

    async close(run) {
      const { id, status, endedAt, errorMessage } = run;
      await db.fork().nativeUpdate(JobRun, { id, status: 'RUNNING' }, { status, endedAt, errorMessage, heartbeatAt: null, ...countsOf(run) });
    },

    async reapExpired(before, exclude, now, message) {
      const em = db.fork();
      const stale = await em.find(JobRun, { status: 'RUNNING', heartbeatAt: { $lt: before } }, { fields: ['id'] });
      let closed = 0;
      for (const { id } of stale) {
        if (exclude.has(id)) continue;
        closed += await em.nativeUpdate(
          JobRun,
          { id, status: 'RUNNING', heartbeatAt: { $lt: before } },
          { status: 'FAILED', endedAt: now, heartbeatAt: null, errorMessage: message },
        );
      }
      return closed;
    },

    closeAllRunning(now, message) {
      return db.fork().nativeUpdate(JobRun, { status: 'RUNNING' }, { status: 'FAILED', endedAt: now, heartbeatAt: null, errorMessage: message });
    },

    async list(page) {
      const rows = await db.fork().find(JobRun, { id: { $gt: page.afterId } }, { orderBy: { id: 'asc' }, limit: page.limit });
      return pageOf(rows, page);
    },
  };
}
