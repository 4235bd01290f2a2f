/**
 * The door of the `job_runs` table: a run is claimed (inserted RUNNING, with
 * its period for scheduled runs), renews its lease while it works, and is
 * closed once, as SUCCEEDED or FAILED, by its process or by another process
 * once its lease ran out. Closing a run and its job_run.finished event are
 * one transaction, so a run is never seen ended without its event.
 */
import type { Database, Tx } from '../db/database';
import type { EventsRepository } from '../events/events.repository';
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

export function createJobRunsRepository(db: Database, events: EventsRepository): JobRunsRepository {
  /** The events of the runs a statement just closed (ids in order), all as FAILED with `message`. */
  async function finished(tx: Tx, closed: readonly { id: number | string; kind: string }[], message: string, now: Date): Promise<number> {
    const runs = closed.map((r) => ({ id: Number(r.id), kind: r.kind })).sort((a, b) => a.id - b.id);
    await events.append(
      tx,
      runs.map((r) => ({ type: 'job_run.finished' as const, userId: 0, refId: r.id, payload: { jobRunId: r.id, kind: r.kind, status: 'FAILED', errorMessage: message } })),
      now,
    );
    return runs.length;
  }

  return {
    async claim(kind, trigger, periodKey, now) {
      const run = new JobRun(kind, trigger, now);
      run.periodKey = periodKey;
      run.heartbeatAt = now;
      try {
        // In a transaction, like every write: it waits for SQLite's write lock (the usage writer thread
        // holds it a chunk at a time) instead of failing after the busy handler's 20 ms.
        run.id = Number(await db.transaction((tx) => tx.em.insert(JobRun, run)));
      } catch (err) {
        if (periodKey !== null && isUniqueViolation(err)) return null;
        throw err;
      }
      return run;
    },

    async heartbeat(id, now) {
      await db.transaction((tx) => tx.em.nativeUpdate(JobRun, { id, status: 'RUNNING' }, { heartbeatAt: now }));
    },

    async close(run) {
      const { id, kind, status, endedAt, errorMessage } = run;
      if (!endedAt) throw new Error(`job run ${id}: closed without an end time`);
      const at = endedAt;
      await db.transaction(async (tx) => {
        const changed = await tx.em.nativeUpdate(
          JobRun,
          { id, status: 'RUNNING' },
          { status, endedAt: at, errorMessage, heartbeatAt: null, ...countsOf(run) },
        );
        if (changed !== 1) return; // a reaper closed it first, with its own event
        await events.append(tx, [{ type: 'job_run.finished', userId: 0, refId: id, payload: { jobRunId: id, kind, status, errorMessage } }], at);
      });
    },

    async reapExpired(before, exclude, now, message) {
      const skip = [...exclude];
      return db.transaction(async (tx) => {
        const closed = await tx.all<{ id: number | string; kind: string }>(
          `update job_runs set status = 'FAILED', ended_at = ?, heartbeat_at = null, error_message = ?
           where status = 'RUNNING' and heartbeat_at < ?${skip.length ? ` and id not in (${skip.map(() => '?').join(', ')})` : ''}
           returning id, kind`,
          [now.getTime(), message, before.getTime(), ...skip],
        );
        return finished(tx, closed, message, now);
      });
    },

    closeAllRunning(now, message) {
      return db.transaction(async (tx) => {
        const closed = await tx.all<{ id: number | string; kind: string }>(
          `update job_runs set status = 'FAILED', ended_at = ?, heartbeat_at = null, error_message = ? where status = 'RUNNING' returning id, kind`,
          [now.getTime(), message],
        );
        return finished(tx, closed, message, now);
      });
    },

    async list(page) {
      const rows = await db.fork().find(JobRun, { id: { $gt: page.afterId } }, { orderBy: { id: 'asc' }, limit: page.limit });
      return pageOf(rows, page);
    },
  };
}
