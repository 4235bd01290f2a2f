/**
 * Part 4, growth: ingestion at 1x and 10x the data (NDJSON, 10k users), and
 * ListUsageLogs on the resulting databases: the whole table walked with
 * page_size 500 (time per page by depth), then the first page and a page 90%
 * deep (page_size 50) called repeatedly, without a filter, by status and by
 * user. 10x the data should cost about 10x to ingest and the same per page.
 */
import * as fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import * as billingPb from '../../generated/billing/v1/billing_service';
import { log, pct, round, unary, type BenchOptions } from './common';
import { runFloor, timedIngest, usageFile } from './ingest';

export interface GrowthIngestRow {
  entries: number;
  seconds: number;
  entriesPerS: number;
  /** The raw-driver floor on the same file (SQLite): the database's own growth. */
  floorInsertS?: number;
  timeRatio?: number;
  floorTimeRatio?: number;
  dataRatio?: number;
}

export interface GrowthListRow {
  entries: number;
  filter: string;
  pages: number;
  walkFirst5Ms: number;
  walkLast5Ms: number;
  firstPageMs: number;
  deepPageMs: number;
  deepOverFirst: number;
}

type Filter = { name: string; req: Partial<billingPb.ListUsageLogsRequest> };

async function probeLists(address: string, entries: number): Promise<GrowthListRow[]> {
  const client = new billingPb.BillingServiceClient(address, grpc.credentials.createInsecure());
  const filters: Filter[] = [
    { name: 'none', req: {} },
    { name: 'status=BILLED', req: { status: billingPb.UsageLogStatus.USAGE_LOG_STATUS_BILLED } },
    { name: 'user_id=7', req: { userId: 7n } },
  ];
  const list = (req: Partial<billingPb.ListUsageLogsRequest>) =>
    unary<billingPb.ListUsageLogsResponse>(client, 'listUsageLogs', { source: 0, userId: 0n, status: 0, pageSize: 0, pageToken: '', ...req });
  const timed = async (req: Partial<billingPb.ListUsageLogsRequest>) => {
    const t = performance.now();
    const res = await list(req);
    return { ms: performance.now() - t, res };
  };
  const rows: GrowthListRow[] = [];
  try {
    for (const f of filters) {
      const walk: number[] = [];
      const tokens: string[] = [''];
      let token = '';
      do {
        const { ms, res } = await timed({ ...f.req, pageSize: 500, pageToken: token });
        walk.push(ms);
        token = res.nextPageToken;
        if (token) tokens.push(token);
      } while (token);
      const deepToken = tokens[Math.floor(tokens.length * 0.9)];
      const first: number[] = [];
      const deep: number[] = [];
      for (let i = 0; i < 30; i++) {
        first.push((await timed({ ...f.req, pageSize: 50, pageToken: '' })).ms);
        deep.push((await timed({ ...f.req, pageSize: 50, pageToken: deepToken })).ms);
      }
      const median = (xs: number[]) => pct([...xs].sort((a, b) => a - b), 50);
      const row: GrowthListRow = {
        entries,
        filter: f.name,
        pages: walk.length,
        walkFirst5Ms: round(median(walk.slice(0, 5)), 3),
        walkLast5Ms: round(median(walk.slice(-5)), 3),
        firstPageMs: round(median(first), 3),
        deepPageMs: round(median(deep), 3),
        deepOverFirst: 0,
      };
      row.deepOverFirst = round(row.deepPageMs / row.firstPageMs, 2);
      rows.push(row);
    }
  } finally {
    client.close();
  }
  return rows;
}

export async function runGrowth(opts: BenchOptions): Promise<{ ingest: GrowthIngestRow[]; list: GrowthListRow[] }> {
  const sizes = opts.quick ? [10_000, 100_000] : [100_000, 1_000_000];
  const ingest: GrowthIngestRow[] = [];
  const list: GrowthListRow[] = [];
  for (const entries of sizes) {
    const file = usageFile(opts, entries, 'ndjson');
    log(`growth: ingest ${entries}`);
    const r = await timedIngest(opts, file, `growth-${entries}`, (address) => probeLists(address, entries));
    const row: GrowthIngestRow = { entries, seconds: round(r.seconds, 2), entriesPerS: Math.round(entries / r.seconds) };
    list.push(...(r.probe as GrowthListRow[]));
    if (r.dbFile) {
      row.floorInsertS = round((await runFloor(file, r.dbFile, r.dbFile + '.floor')).insertMs / 1000, 2);
      for (const suffix of ['', '-wal', '-shm']) fs.rmSync(r.dbFile + suffix, { force: true });
    }
    ingest.push(row);
  }
  ingest[1].timeRatio = round(ingest[1].seconds / ingest[0].seconds, 2);
  if (ingest[0].floorInsertS && ingest[1].floorInsertS) ingest[1].floorTimeRatio = round(ingest[1].floorInsertS / ingest[0].floorInsertS, 2);
  ingest[1].dataRatio = sizes[1] / sizes[0];
  return { ingest, list };
}
