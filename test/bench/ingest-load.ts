/**
 * Part 5, ingestion under load: while ProcessLogs ingests the largest file
 * (1M entries, or 100k with --quick), AddFunds and GetBalance each run in a
 * closed loop at 16 in flight through grpc-js clients. Reports p50/p99/max for
 * both, how many calls started and finished during the ingestion, and the
 * ingestion time with the load against the same file ingested without it
 * (fresh database each, same run). Before the ingestion the same load runs
 * for a few seconds, after a second of unmeasured warm-up each: on SQLite
 * first against the raw floor server (floor-server.ts: the same SQL with raw
 * better-sqlite3 behind grpc-js, on the same file, one durable COMMIT per
 * AddFunds), then against the idle service. So the latencies have two floors
 * from the same run: what this machine, client and driver give with nothing
 * but the load, and what the service gives idle. AddFunds is cross-checked
 * against the CREDIT rows it wrote (the floor server's included). The two
 * RPCs' clients share the benchmark's thread. Giving each a thread of its own
 * was tried (two quick runs against two): on two cores, 25-30% fewer calls
 * were answered during the ingestion, and no p99 was lower.
 */
import * as fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { clients, closedLoop, freshDb, log, loggedSeal, mb, pct, round, seedUsers, sleep, startHelper, startService, unary, type BenchOptions, type Clients } from './common';
import type { UsageFormat } from './data';
import { FLOOR_ADD_FUNDS, FLOOR_GET_BALANCE } from './floor-server';
import { FUNDS, USERS, timedIngest, usageFile } from './ingest';

/** Calls in flight per RPC while the ingestion runs. */
export const LOAD_IN_FLIGHT = 16;
/** Seconds of the same load on the idle service before the ingestion starts (and on the floor server before that). */
const IDLE_SECONDS = 3;
/** Unmeasured load before each idle measurement: the first calls open connections and compile code. */
const WARMUP_MS = 1000;

export interface LoadRow {
  phase: 'floor server, idle' | 'idle' | 'during ingestion';
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

/** The two calls of the load: the service's, or the raw floor server's (same messages, its own paths). */
interface LoadCalls {
  addFunds(userId: bigint): Promise<unknown>;
  getBalance(userId: bigint): Promise<unknown>;
}

const ONE_DOLLAR = { currencyCode: 'USD', units: 1n, nanos: 0 };

function serviceCalls(c: Clients): LoadCalls {
  return {
    addFunds: (userId) => unary(c.wallets, 'addFunds', { userId, amount: ONE_DOLLAR, requestId: '' }, 30_000),
    getBalance: (userId) => unary(c.wallets, 'getBalance', { userId }, 30_000),
  };
}

/** Calls of floor-server.ts; the answers are decoded, as the generated client decodes the service's. */
function floorCalls(client: grpc.Client): LoadCalls {
  const call = <T>(rpcPath: string, message: Uint8Array, decode: (b: Buffer) => T) =>
    new Promise<T>((resolve, reject) =>
      client.makeUnaryRequest(rpcPath, (b: Buffer) => b, (b: Buffer) => b, Buffer.from(message), new grpc.Metadata(), { deadline: Date.now() + 30_000 }, (err, res) =>
        err ? reject(err) : resolve(decode(res!)),
      ),
    );
  return {
    addFunds: (userId) => call(FLOOR_ADD_FUNDS, walletPb.AddFundsRequest.encode({ userId, amount: ONE_DOLLAR, requestId: '' }).finish(), walletPb.AddFundsResponse.decode),
    getBalance: (userId) => call(FLOOR_GET_BALANCE, walletPb.GetBalanceRequest.encode({ userId }).finish(), walletPb.GetBalanceResponse.decode),
  };
}

function startLoad(calls: LoadCalls, phase: LoadRow['phase'], inFlight: number): { stop(): Promise<LoadRow[]>; addFundsOk(): number } {
  // Funds go to the lower half of the users, balances are read from the upper half; all are billed by the file.
  const add = startLoop(phase, 'AddFunds', inFlight, (i) => calls.addFunds(BigInt(1 + (i % (USERS / 2)))));
  const get = startLoop(phase, 'GetBalance', inFlight, (i) => calls.getBalance(BigInt(USERS / 2 + 1 + (i % (USERS / 2)))));
  return {
    addFundsOk: add.ok,
    stop: async () => [await add.stop(), await get.stop()],
  };
}

/**
 * The load for WARMUP_MS unmeasured (connections, JIT), then IDLE_SECONDS measured.
 * Returns the measured rows and every AddFunds that answered OK in both.
 */
async function idleLoad(calls: LoadCalls, phase: LoadRow['phase']): Promise<{ rows: LoadRow[]; credits: number }> {
  const warm = startLoad(calls, phase, LOAD_IN_FLIGHT);
  await sleep(WARMUP_MS);
  await warm.stop();
  const idle = startLoad(calls, phase, LOAD_IN_FLIGHT);
  await sleep(IDLE_SECONDS * 1000);
  const rows = await idle.stop();
  return { rows, credits: warm.addFundsOk() + idle.addFundsOk() };
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
    let idleCredits = 0;
    if (db.file) {
      // The floor: the same load on the same file, answered by raw better-sqlite3 behind grpc-js (floor-server.ts).
      const floor = await startHelper('floor-server.js', [db.file]);
      const floorClient = new grpc.Client(`127.0.0.1:${floor.port}`, grpc.credentials.createInsecure());
      try {
        const f = await idleLoad(floorCalls(floorClient), 'floor server, idle');
        loadRows.push(...f.rows);
        idleCredits += f.credits;
      } finally {
        floorClient.close();
        await floor.stop();
      }
    }
    const idle = await idleLoad(serviceCalls(load), 'idle');
    loadRows.push(...idle.rows);
    idleCredits += idle.credits;

    const during = startLoad(serviceCalls(load), 'during ingestion', LOAD_IN_FLIGHT);
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
