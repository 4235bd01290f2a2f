/**
 * JobService: triggers the jobs by hand. A run is shared by every trigger
 * that joins it, so a caller that goes away stops waiting for it, not the run.
 */
import type { JobsService } from '../jobs/jobs.types';
import * as pb from '../../generated/billing/v1/job_service';
import type { Unary } from './adapter';
import { jobRunToPb, pageRequest } from './convert';

export interface JobHandlersDeps {
  unary: Unary;
  jobs: JobsService;
}

export function createJobHandlers({ unary, jobs }: JobHandlersDeps): pb.JobServiceServer {
  return {
    processLogs: unary<pb.ProcessLogsRequest, pb.ProcessLogsResponse>('ProcessLogs', async () => ({
      jobRun: jobRunToPb(await jobs.run('PROCESS_LOGS', 'rpc')),
    })),

    processRetries: unary<pb.ProcessRetriesRequest, pb.ProcessRetriesResponse>('ProcessRetries', async () => ({
      jobRun: jobRunToPb(await jobs.run('PROCESS_RETRIES', 'rpc')),
    })),

    processAll: unary<pb.ProcessAllRequest, pb.ProcessAllResponse>('ProcessAll', async () => ({
      jobRun: jobRunToPb(await jobs.run('PROCESS_ALL', 'rpc')),
    })),

    listJobRuns: unary<pb.ListJobRunsRequest, pb.ListJobRunsResponse>('ListJobRuns', async (req) => {
      const page = await jobs.listRuns(pageRequest(req));
      return { jobRuns: page.items.map(jobRunToPb), nextPageToken: page.nextPageToken };
    }),
  };
}
