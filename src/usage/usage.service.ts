/** Usage as callers read it: the stored entries, paged. (Ingestion is ./ingest.ts.) */
import type { CallContext } from '../shared/context';
import { readPage, type PageRequest } from '../shared/paging';
import type { UsageLog, UsageLogStatus } from './usage-log.entity';
import type { UsageLogsRepository } from './usage-logs.repository';

export interface UsageService {
  listUsageLogs(
    ctx: CallContext,
    filter: { userId: number | null; status: UsageLogStatus | null },
    page: PageRequest,
  ): Promise<{ items: UsageLog[]; nextPageToken: string }>;
}

export function createUsageService(deps: { usageLogs: UsageLogsRepository }): UsageService {
  return {
    listUsageLogs: (ctx, filter, page) => deps.usageLogs.list(ctx.em, filter, readPage(page, filter)),
  };
}
