/**
 * Part 1, ingestion: ProcessLogs end to end through the gRPC trigger on a
 * fresh database with 10k funded users (so every record is charged), for a
 * JSON array and NDJSON file of 100k and 1M entries. Entries/s, peak RSS of the
 * service process, and the ratio to the raw-driver floor (floor-sqlite.ts) run
 * on the same file in the same run.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as jobPb from '../../generated/billing/v1/job_service';
import { clients, freshDb, log, loggedSeal, mb, paths, seedUsers, startService, unary, type BenchOptions } from './common';
import { writeUsageFile, type UsageFormat } from './data';

export const USERS = 10_000;
/** Every seeded wallet: far more than any generated usage costs, so each record is charged at once. */
export const FUNDS = 10_000_000n * 1_000_000n;

export interface IngestRow {
  entries: number;
  format: UsageFormat;
  db: string;
  seconds: number;
  /** CPU seconds the service process used during the run (all its threads). */
  cpuS: number;
  entriesPerS: number;
  peakRssMb: number;
  baseRssMb: number;
  recordsCreated: number;
  charged: number;
  status: string;
  floorTotalS?: number;
  floorInsertS?: number;
  /** The floor's CPU seconds over the same phases as floorTotalS. */
  floorCpuS?: number;
  ratioToFloor?: number;
  /** cpuS / floorCpuS: less moved by other work on a shared machine than the wall-clock ratio. */
  cpuRatioToFloor?: number;
  ratioToFloorInsert?: number;
  /** --floor-keys: the floor's inserts with a unique 64-bit integer identity index instead of the text one. */
  floorInsertIntKeyS?: number;
  /** --floor-keys: the floor's inserts with no identity index at all (a bound: not exactly-once). */
  floorInsertNoKeyIndexS?: number;
  /** From the service's log: the run's records prepared, then sealed (bounded transactions), and the longest of the latter. */
  prepareMs?: number;
  sealMs?: number;
  longestSealTxMs?: number;
}

export function usageFile(opts: BenchOptions, entries: number, format: UsageFormat): string {
  const file = path.join(opts.workDir, `usage-${entries}.${format === 'json' ? 'json' : 'ndjson'}`);
  if (!fs.existsSync(file)) {
    const t = Date.now();
    const size = writeUsageFile(file, format, entries, USERS);
    log(`generated ${file} (${mb(size)} MB) in ${Date.now() - t} ms`);
  }
  return file;
}

export interface IngestRun {
  seconds: number;
  cpuSeconds: number;
  peakRssBytes: number;
  baseRssBytes: number;
  jobRun: jobPb.JobRun;
  /** SQLite file the service used (for the floor's schema), if any. */
  dbFile?: string;
  /** ListUsageLogs probe results, when asked for. */
  probe?: unknown;
  /** The seal the service logged, if it did. */
  seal: ReturnType<typeof loggedSeal>;
}

/** Fresh database + service + 10k funded users, then one timed ProcessLogs. */
export async function timedIngest(
  opts: BenchOptions,
  file: string,
  label: string,
  after?: (address: string) => Promise<unknown>,
): Promise<IngestRun> {
  const db = await freshDb(opts, label);
  const svc = await startService(opts, { ...db.env, LOG_FILE_PATH: file }, label);
  const c = clients(svc.address);
  try {
    await seedUsers(db, USERS, FUNDS);
    await db.close();
    const baseRssBytes = svc.rss();
    const cpu0 = svc.cpuSeconds();
    const t0 = performance.now();
    const res = await unary<jobPb.ProcessLogsResponse>(c.jobs, 'processLogs', {}, 3_600_000);
    const seconds = (performance.now() - t0) / 1000;
    const cpuSeconds = svc.cpuSeconds() - cpu0;
    const peakRssBytes = svc.peakRss();
    const probe = after ? await after(svc.address) : undefined;
    return { seconds, cpuSeconds, peakRssBytes, baseRssBytes, jobRun: res.jobRun!, dbFile: db.file, probe, seal: loggedSeal(svc.logFile) };
  } finally {
    c.close();
    await svc.stop();
    if (!db.file) await db.drop();
  }
}

export function runFloor(
  file: string,
  schemaDb: string,
  scratch: string,
  key: 'text' | 'int' | 'none' = 'text',
): Promise<{ rows: number; parseMs: number; insertMs: number; totalMs: number; cpuMs: number }> {
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [paths.benchJs('floor-sqlite.js'), file, schemaDb, scratch, '', '', key],
      { maxBuffer: 1 << 20 },
      (err, stdout, stderr) => (err ? reject(new Error(`floor failed: ${stderr}`)) : resolve(JSON.parse(stdout.trim()))),
    );
  });
}

export async function runIngest(opts: BenchOptions): Promise<IngestRow[]> {
  const sizes = opts.sizes ?? (opts.quick ? [100_000] : [100_000, 1_000_000]);
  const rows: IngestRow[] = [];
  for (const entries of sizes) {
    for (const format of opts.formats ?? (['json', 'ndjson'] as UsageFormat[])) {
      const file = usageFile(opts, entries, format);
      log(`ingest ${entries} ${format} on ${opts.db}`);
      const r = await timedIngest(opts, file, `ingest-${entries}-${format}`);
      const row: IngestRow = {
        entries,
        format,
        db: opts.db,
        seconds: r.seconds,
        cpuS: Math.round(r.cpuSeconds * 10) / 10,
        entriesPerS: Math.round(entries / r.seconds),
        peakRssMb: mb(r.peakRssBytes),
        baseRssMb: mb(r.baseRssBytes),
        recordsCreated: Number(r.jobRun.billingRecordsCreated),
        charged: Number(r.jobRun.chargesSucceeded),
        status: jobPb.JobRunStatus[r.jobRun.status].replace('JOB_RUN_STATUS_', '') + (r.jobRun.errorMessage ? ` ${r.jobRun.errorMessage}` : ''),
        ...r.seal,
      };
      if (Number(r.jobRun.entriesAccepted) !== entries) row.status += ` (accepted ${r.jobRun.entriesAccepted} of ${entries}!)`;
      if (r.dbFile) {
        log(`floor ${entries} ${format}`);
        const floor = await runFloor(file, r.dbFile, r.dbFile + '.floor');
        if (floor.rows !== entries) throw new Error(`floor stored ${floor.rows} rows, expected ${entries}`);
        row.floorTotalS = floor.totalMs / 1000;
        row.floorInsertS = floor.insertMs / 1000;
        row.ratioToFloor = r.seconds / row.floorTotalS;
        row.ratioToFloorInsert = r.seconds / row.floorInsertS;
        row.floorCpuS = Math.round(floor.cpuMs / 100) / 10;
        row.cpuRatioToFloor = r.cpuSeconds / (floor.cpuMs / 1000);
        if (opts.floorKeys) {
          // The same floor with other designs of the identity index: what a new key design could give at most.
          for (const key of ['int', 'none'] as const) {
            log(`floor ${entries} ${format}, identity index: ${key}`);
            const f = await runFloor(file, r.dbFile, r.dbFile + '.floor', key);
            if (f.rows !== entries) throw new Error(`floor (${key}) stored ${f.rows} rows, expected ${entries}`);
            row[key === 'int' ? 'floorInsertIntKeyS' : 'floorInsertNoKeyIndexS'] = f.insertMs / 1000;
          }
        }
        for (const suffix of ['', '-wal', '-shm']) fs.rmSync(r.dbFile + suffix, { force: true });
      }
      log(JSON.stringify(row));
      rows.push(row);
    }
  }
  return rows;
}
