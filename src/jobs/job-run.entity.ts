import { EntitySchema } from '@mikro-orm/core';
import { EpochMsType } from '../db/types';
import type { IngestCounts } from '../usage/ingest';

export type JobKind = 'PROCESS_LOGS' | 'PROCESS_RETRIES' | 'PROCESS_ALL';
export type JobRunStatus = 'RUNNING' | 'SUCCEEDED' | 'FAILED';

/** What a run counted (ingestion's counts, which include the charges'); every field starts at 0. */
export type JobCounts = Omit<IngestCounts, 'notice'>;

/** The counts of a run, as a plain object (for its log line and its row). */
export function countsOf(run: JobCounts): JobCounts {
  const { entriesRead, entriesAccepted, entriesDuplicate, entriesConflict, entriesRejected, entriesPending } = run;
  const { billingRecordsCreated, chargesSucceeded, retriesScheduled, recordsFailed, usersSuspended } = run;
  return {
    entriesRead,
    entriesAccepted,
    entriesDuplicate,
    entriesConflict,
    entriesRejected,
    entriesPending,
    billingRecordsCreated,
    chargesSucceeded,
    retriesScheduled,
    recordsFailed,
    usersSuspended,
  };
}

export class JobRun implements JobCounts {
  id!: number;
  kind: JobKind;
  status: JobRunStatus = 'RUNNING';
  trigger: string;
  startedAt: Date;
  endedAt: Date | null = null;
  entriesRead = 0;
  entriesAccepted = 0;
  entriesDuplicate = 0;
  entriesConflict = 0;
  entriesRejected = 0;
  entriesPending = 0;
  billingRecordsCreated = 0;
  chargesSucceeded = 0;
  retriesScheduled = 0;
  recordsFailed = 0;
  usersSuspended = 0;
  errorMessage = '';
  /** For scheduled runs: the job and cron tick this run claimed (unique across replicas). */
  periodKey: string | null = null;
  /** While RUNNING: when its process last said it is still working (see JobsDeps.leaseMs). */
  heartbeatAt: Date | null = null;

  constructor(kind: JobKind, trigger: string, now: Date) {
    this.kind = kind;
    this.trigger = trigger;
    this.startedAt = now;
  }
}

const count = { type: 'number' } as const;

export const JobRunSchema = new EntitySchema<JobRun>({
  class: JobRun,
  tableName: 'job_runs',
  properties: {
    id: { type: 'number', primary: true, autoincrement: true },
    kind: { type: 'string' },
    status: { type: 'string' },
    trigger: { type: 'string' },
    startedAt: { type: EpochMsType },
    endedAt: { type: EpochMsType, nullable: true },
    entriesRead: count,
    entriesAccepted: count,
    entriesDuplicate: count,
    entriesConflict: count,
    entriesRejected: count,
    entriesPending: count,
    billingRecordsCreated: count,
    chargesSucceeded: count,
    retriesScheduled: count,
    recordsFailed: count,
    usersSuspended: count,
    errorMessage: { type: 'text' },
    periodKey: { type: 'string', nullable: true },
    heartbeatAt: { type: EpochMsType, nullable: true },
  },
});
