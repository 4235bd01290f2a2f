/**
 * Part 5, ingestion under load: while ProcessLogs ingests the largest file
 * (1M entries, or 100k with --quick), AddFunds and GetBalance each run in a
 * closed loop at 16 in flight through grpc-js clients. Reports p50/p99/max for
 * both, how many calls started and finished during the ingestion, and the
 * ingestion time with the load against the same file ingested without it
 * (fresh database each, same run). The same load is first run for a few
 * seconds on the idle service, so the latencies have a floor from the same
 * process. AddFunds is cross-checked against the CREDIT rows it wrote.
 */
import * as fs from 'node:fs';
import * as jobPb from '../../generated/billing/v1/job_service';
import { clients, closedLoop, freshDb, log, loggedSeal, mb, pct, round, seedUsers, sleep, startService, unary, type BenchOptions, type Clients } from './common';
import type { UsageFormat } from './data';
import { FUNDS, USERS, timedIngest, usageFile } from './ingest';

/** Calls in flight per RPC while the ingestion runs. */
export const LOAD_IN_FLIGHT = 16;
/** Seconds of the same load on the idle service before the ingestion starts. */
const IDLE_SECONDS = 3;

export interface LoadRow {
  phase: 'idle' | 'during ingestion';
  rpc: 'AddFunds' | 'GetBalance';
  inFlight: number;
  calls: number;
  errors: number;
  callsPerS: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

export interface IngestLoadRow {
  entries: number;
  format: UsageFormat;
  db: string;
  /** ProcessLogs alone, fresh database. */
  secondsWithoutLoad: number;
  /** ProcessLogs with the load running, fresh database. */
  secondsWithLoad: number;
  ratio: number;
  peakRssMbWithLoad: number;
  status: string;
  addFundsCheck: string;
  /** The longest sealing transaction of the run under load (the service's log): what a write may wait for at its end. */
  longestSealTxMs?: number;
}

interface Loop {
  stop(): Promise<LoadRow>;
}

/** `inFlight` workers calling `fn` back to back until stopped; only calls that finished are timed. */
function startLoop(phase: LoadRow['phase'], rpc: LoadRow['rpc'], inFlight: number, fn: (i: number) => Promise<unknown>): Loop & { ok(): number } {
  let running = true;
  const loop = closedLoop(inFlight, fn, () => running);
  return {
    ok: () => loop.finished(),
    async stop() {
      running = false;
      const { latencies, errors, seconds: elapsed } = await loop.done;
      return {
        phase,
        rpc,
        inFlight,
        calls: latencies.length,
        errors,
        callsPerS: Math.round(latencies.length / elapsed),
        p50Ms: round(pct(latencies, 50), 2),
        p99Ms: round(pct(latencies, 99), 2),
        maxMs: round(latencies[latencies.length - 1] ?? NaN, 2),
      };
    },
  };
}

function startLoad(c: Clients, phase: LoadRow['phase'], inFlight: number): { stop(): Promise<LoadRow[]>; addFundsOk(): number } {
  // Funds go to the lower half of the users, balances are read from the upper half; all are billed by the file.
  const add = startLoop(phase, 'AddFunds', inFlight, (i) =>
    unary(c.wallets, 'addFunds', { userId: BigInt(1 + (i % (USERS / 2))), amount: { currencyCode: 'USD', units: 1n, nanos: 0 }, requestId: '' }, 30_000),
  );
  const get = startLoop(phase, 'GetBalance', inFlight, (i) => unary(c.wallets, 'getBalance', { userId: BigInt(USERS / 2 + 1 + (i % (USERS / 2))) }, 30_000));
  return {
    addFundsOk: add.ok,
    stop: async () => [await add.stop(), await get.stop()],
  };
}

export async function runIngestLoad(opts: BenchOptions): Promise<{ rows: IngestLoadRow[]; load: LoadRow[] }> {
  const sizes = opts.sizes ?? (opts.quick ? [100_000] : [1_000_000]);
  const entries = Math.max(...sizes);
  const format: UsageFormat = (opts.formats ?? ['ndjson'])[0];
  const file = usageFile(opts, entries, format);

  log(`ingest-load: ${entries} ${format} without load`);
  const alone = await timedIngest(opts, file, `ingest-alone-${entries}`);
  if (alone.dbFile) for (const suffix of ['', '-wal', '-shm']) fs.rmSync(alone.dbFile + suffix, { force: true });

  log(`ingest-load: ${entries} ${format} with AddFunds and GetBalance at ${LOAD_IN_FLIGHT} in flight each`);
  const db = await freshDb(opts, `ingest-load-${entries}`);
  const svc = await startService(opts, { ...db.env, LOG_FILE_PATH: file }, `ingest-load-${entries}`);
  const jobs = clients(svc.address);
  const load = clients(svc.address);
  const loadRows: LoadRow[] = [];
  try {
    await seedUsers(db, USERS, FUNDS);
    await db.close();
    const idle = startLoad(load, 'idle', LOAD_IN_FLIGHT);
    await sleep(IDLE_SECONDS * 1000);
    loadRows.push(...(await idle.stop()));
    const idleCredits = idle.addFundsOk();

    const during = startLoad(load, 'during ingestion', LOAD_IN_FLIGHT);
    const t0 = performance.now();
    const res = await unary<jobPb.ProcessLogsResponse>(jobs.jobs, 'processLogs', {}, 3_600_000);
    const secondsWithLoad = (performance.now() - t0) / 1000;
    const duringRows = await during.stop();
    loadRows.push(...duringRows);
    const peakRss = svc.peakRss();
    const run = res.jobRun!;

    // Every AddFunds that answered OK wrote exactly one CREDIT row (seeding wrote one per user).
    const credits = Number(
      (await db.query<{ n: number | string }>(`select count(*) as n from wallet_transactions where type = 'CREDIT'`))[0].n,
    );
    const expected = USERS + idleCredits + during.addFundsOk();
    const row: IngestLoadRow = {
      entries,
      format,
      db: opts.db,
      secondsWithoutLoad: round(alone.seconds, 2),
      secondsWithLoad: round(secondsWithLoad, 2),
      ratio: round(secondsWithLoad / alone.seconds, 2),
      peakRssMbWithLoad: mb(peakRss),
      status:
        jobPb.JobRunStatus[run.status].replace('JOB_RUN_STATUS_', '') +
        (Number(run.entriesAccepted) !== entries ? ` (accepted ${run.entriesAccepted} of ${entries}!)` : '') +
        ` charged ${run.chargesSucceeded}`,
      addFundsCheck: `CREDIT rows ${credits - USERS} vs OK calls ${expected - USERS}${credits === expected ? '' : ' MISMATCH'}`,
      longestSealTxMs: loggedSeal(svc.logFile)?.longestSealTxMs,
    };
    log(`ingest-load: ${JSON.stringify(row)} ${JSON.stringify(duringRows)}`);
    return { rows: [row], load: loadRows };
  } finally {
    jobs.close();
    load.close();
    await svc.stop();
    await db.drop();
  }
}
