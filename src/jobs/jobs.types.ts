import type { PageRequest } from '../shared/paging';
import type { JobKind, JobRun } from './job-run.entity';

export type JobTrigger = 'rpc' | 'cron' | 'scheduler';

export interface JobsService {
  /**
   * Runs a job and records the run. A call while a run of the same kind is in
   * progress in this process does not start a second one: it waits for that
   * run and returns it.
   */
  run(kind: JobKind, trigger: JobTrigger): Promise<JobRun>;
  /**
   * Runs a scheduled job for one period (e.g. one cron tick) unless any
   * replica sharing the database already claimed that period; then it
   * returns null and does nothing.
   */
  runForPeriod(kind: JobKind, periodKey: string): Promise<JobRun | null>;
  /**
   * Marks runs left RUNNING by a process that died as FAILED ("interrupted").
   * Only for a database one process owns (SQLite): with replicas, a RUNNING
   * run may be another replica's live one.
   */
  closeInterruptedRuns(): Promise<number>;
  /**
   * Closes as FAILED ("abandoned") the RUNNING runs of other processes whose
   * heartbeat is older than the lease; returns how many.
   */
  reapAbandonedRuns(): Promise<number>;
  /** Runs reapAbandonedRuns now and every half lease, until stopReaper. */
  startReaper(): void;
  stopReaper(): Promise<void>;
  listRuns(page: PageRequest): Promise<{ items: JobRun[]; nextPageToken: string }>;
}
