/**
 * Shared pieces of the benchmarks: options, a fresh database per measurement
 * (SQLite file or PostgreSQL database), the service as a child process with
 * its RSS sampled from /proc, gRPC clients, statistics and tables.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { Client as PgClient } from 'pg';
import Database from 'better-sqlite3';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';

export type Part = 'ingest' | 'ingest-load' | 'rpc' | 'retries' | 'growth' | 'usage-api' | 'events';
export const ALL_PARTS: readonly Part[] = ['ingest', 'ingest-load', 'rpc', 'retries', 'growth', 'usage-api', 'events'];

export interface BenchOptions {
  quick: boolean;
  only: Part[];
  db: 'sqlite' | 'postgres';
  replicas: number;
  /** Where bench-results.json goes. */
  out: string;
  /** LOG_LEVEL of the service processes (info is the production default). */
  logLevel: string;
  /** USAGE_WRITER of the service processes, when given (default: the service's own, the thread on a SQLite file). */
  usageWriter?: 'thread' | 'inline';
  /** Seconds per h2load / client run. */
  rpcSeconds: number;
  /** Scratch directory (databases, usage files, logs). */
  workDir: string;
  /** Ingestion sizes and formats (default: 100k and 1M, or 100k with --quick; both formats). */
  sizes?: number[];
  formats?: ('json' | 'ndjson')[];
  /** Ingestion: also run the raw floor with other designs of the identity index (floor-sqlite.ts `key`). */
  floorKeys?: boolean;
}

/** The compiled tree this file runs from (dist/ for `npm run bench`). */
const COMPILED = path.resolve(__dirname, '..', '..');
/** The node_modules the compiled code resolves its packages from. */
const NODE_MODULES = path.resolve(path.dirname(require.resolve('@grpc/grpc-js/package.json')), '..', '..');

/**
 * Where the compiled code the bench runs lives. `snapshotDist` copies it to
 * the scratch directory first, so a rebuild in the work tree (which empties
 * dist/) cannot pull the service out from under a running benchmark.
 */
export const paths = {
  dist: COMPILED,
  get mainJs() {
    return path.join(this.dist, 'src', 'main.js');
  },
  benchJs(name: string) {
    return path.join(this.dist, 'test', 'bench', name);
  },
};

export function snapshotDist(workDir: string): void {
  const app = path.join(workDir, 'app');
  fs.mkdirSync(app, { recursive: true });
  fs.cpSync(COMPILED, path.join(app, 'dist'), { recursive: true });
  fs.symlinkSync(NODE_MODULES, path.join(app, 'node_modules'), 'dir');
  paths.dist = path.join(app, 'dist');
}
export const PG_ADMIN_URL = process.env.TEST_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

/** A helper server process (trivial-server.js or floor-server.js) on a free port. */
export async function startHelper(script: string, args: string[] = []): Promise<{ port: number; stop(): Promise<void> }> {
  const port = await freePort();
  const child = spawn(process.execPath, [paths.benchJs(script), String(port), ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => d.toString().includes('ready') && resolve());
    child.on('exit', (code) => reject(new Error(`${script} exited ${code}`)));
  });
  return {
    port,
    stop: () =>
      new Promise<void>((resolve) => {
        child.on('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

// ---------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------

/** A fresh database and a plain SQL handle on it (the bench's own connection, not the service's). */
export interface BenchDb {
  kind: 'sqlite' | 'postgres';
  /** Environment that points the service at it. */
  env: Record<string, string>;
  /** SQLite: the file. */
  file?: string;
  /** Runs one statement with `?` placeholders; returns rows. */
  query<T = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<T[]>;
  /** Runs a script of statements (no params). */
  exec(sql: string): Promise<void>;
  close(): Promise<void>;
  /** Closes and removes the database. */
  drop(): Promise<void>;
}

function sqliteDb(file: string): BenchDb {
  let db: Database.Database | null = null;
  const open = (): Database.Database => {
    if (!db) {
      db = new Database(file);
      db.pragma('busy_timeout = 10000');
    }
    return db;
  };
  const close = async () => {
    db?.close();
    db = null;
  };
  return {
    kind: 'sqlite',
    env: { DB_PATH: file },
    file,
    query: async <T>(sql: string, params: unknown[] = []) => {
      const stmt = open().prepare(sql);
      if (stmt.reader) return stmt.all(params) as T[];
      stmt.run(params);
      return [];
    },
    exec: async (sql: string) => void open().exec(sql),
    close,
    async drop() {
      await close();
      for (const suffix of ['', '-wal', '-shm']) fs.rmSync(file + suffix, { force: true });
    },
  };
}

async function pgAdmin(sql: string): Promise<void> {
  const c = new PgClient({ connectionString: PG_ADMIN_URL });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}

async function postgresDb(): Promise<BenchDb> {
  const name = `billing_bench_${process.pid}_${randomBytes(4).toString('hex')}`;
  await pgAdmin(`create database ${name}`);
  const url = new URL(PG_ADMIN_URL);
  url.pathname = `/${name}`;
  let client: PgClient | null = null;
  const open = async (): Promise<PgClient> => {
    if (!client) {
      client = new PgClient({ connectionString: url.toString() });
      await client.connect();
    }
    return client;
  };
  const toPg = (sql: string) => {
    let i = 0;
    return sql.replace(/\?/g, () => `$${++i}`);
  };
  const close = async () => {
    const c = client;
    client = null;
    await c?.end();
  };
  return {
    kind: 'postgres',
    env: { DATABASE_URL: url.toString() },
    async query<T>(sql: string, params: unknown[] = []) {
      return (await (await open()).query(toPg(sql), params)).rows as T[];
    },
    async exec(sql: string) {
      await (await open()).query(sql);
    },
    close,
    async drop() {
      await close();
      await pgAdmin(`drop database if exists ${name} with (force)`);
    },
  };
}

export async function freshDb(opts: BenchOptions, label: string): Promise<BenchDb> {
  if (opts.db === 'postgres') return postgresDb();
  const file = path.join(opts.workDir, `${label}-${randomBytes(3).toString('hex')}.db`);
  return sqliteDb(file);
}

// ---------------------------------------------------------------------------
// The service as a child process
// ---------------------------------------------------------------------------

/** What the service logged of an ingestion's end ("ingestion run sealed"), ms. */
export interface LoggedSeal {
  /** Writing the records' lines, in bounded transactions. */
  prepareMs: number;
  /** From deciding the run to its last record sealed, in bounded transactions. */
  sealMs: number;
  /** The longest of those sealing transactions: the longest the seal held the one writer, which every write waits for. */
  longestSealTxMs: number;
}

/** The last ingestion seal logged in `logFile`; null when none was (a log level above info). */
export function loggedSeal(logFile: string): LoggedSeal | null {
  let found: LoggedSeal | null = null;
  for (const line of fs.readFileSync(logFile, 'utf8').split('\n')) {
    if (!line.includes('"ingestion run sealed"')) continue;
    const { prepareMs, sealMs, longestSealTxMs } = JSON.parse(line) as LoggedSeal;
    found = { prepareMs, sealMs, longestSealTxMs };
  }
  return found;
}

export interface ServiceProcess {
  pid: number;
  port: number;
  address: string;
  logFile: string;
  /** Peak RSS so far in bytes: max of /proc VmHWM and the polled VmRSS. */
  peakRss(): number;
  /** Current RSS in bytes. */
  rss(): number;
  /** CPU seconds (user + system, all threads) the process has used so far. */
  cpuSeconds(): number;
  /** SIGTERM and wait for the exit (SIGKILL after 20 s). */
  stop(): Promise<number | null>;
}

function procStatusKb(pid: number, field: string): number {
  try {
    const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** utime + stime of a process from /proc/PID/stat, in seconds (fields 14 and 15, counted after the command's parenthesis). */
function procCpuSeconds(pid: number): number {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
  } catch {
    return 0;
  }
}
/** USER_HZ: Linux reports process times in 1/100 s on every platform Node runs on. */
const CLOCK_TICKS = 100;

/** grpc.health.v1.Health/Check for the whole server answers SERVING (status 1: bytes 08 01). */
function serving(address: string): Promise<boolean> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  const identity = (b: Buffer) => b;
  return new Promise((resolve) => {
    client.makeUnaryRequest('/grpc.health.v1.Health/Check', identity, identity, Buffer.alloc(0), new grpc.Metadata(), { deadline: Date.now() + 1000 }, (err, res) => {
      client.close();
      resolve(!err && res !== undefined && res.equals(Buffer.from([8, 1])));
    });
  });
}

export async function startService(opts: BenchOptions, env: Record<string, string>, label: string): Promise<ServiceProcess> {
  const port = await freePort();
  const logFile = path.join(opts.workDir, `${label}-${port}.log`);
  const out = fs.openSync(logFile, 'w');
  // BENCH_SERVICE_NODE_ARGS (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof") profiles the service processes.
  const nodeArgs = (process.env.BENCH_SERVICE_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const child: ChildProcess = spawn(process.execPath, [...nodeArgs, paths.mainJs], {
    cwd: opts.workDir,
    env: {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      GRPC_HOST: '127.0.0.1',
      GRPC_PORT: String(port),
      LOG_LEVEL: opts.logLevel,
      ...(opts.usageWriter ? { USAGE_WRITER: opts.usageWriter } : {}),
      INGEST_CRON: 'off',
      LOG_FILE_PATH: path.join(opts.workDir, 'no-usage-file.json'),
      ...env,
    },
    stdio: ['ignore', out, out],
  });
  fs.closeSync(out);
  let exited: number | null | undefined;
  const exit = new Promise<number | null>((resolve) =>
    child.on('exit', (code) => {
      exited = code;
      resolve(code);
    }),
  );
  const pid = child.pid!;
  let peak = 0;
  const sample = () => {
    peak = Math.max(peak, procStatusKb(pid, 'VmRSS'), procStatusKb(pid, 'VmHWM'));
  };
  const sampler = setInterval(sample, 25);
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (exited !== undefined) {
      clearInterval(sampler);
      throw new Error(`service exited with ${exited} before it was ready; log: ${logFile}\n${fs.readFileSync(logFile, 'utf8').slice(-2000)}`);
    }
    if (await serving(`127.0.0.1:${port}`)) break;
    if (Date.now() > deadline) throw new Error(`service not ready after 60 s; log: ${logFile}`);
    await sleep(50);
  }
  return {
    pid,
    port,
    address: `127.0.0.1:${port}`,
    logFile,
    peakRss: () => {
      if (exited === undefined) sample();
      return peak * 1024;
    },
    rss: () => procStatusKb(pid, 'VmRSS') * 1024,
    cpuSeconds: () => procCpuSeconds(pid),
    async stop() {
      if (exited === undefined) sample();
      clearInterval(sampler);
      if (exited !== undefined) return exited;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      const code = await exit;
      clearTimeout(timer);
      return code;
    },
  };
}

// ---------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------

export interface Clients {
  users: userPb.UserServiceClient;
  wallets: walletPb.WalletServiceClient;
  billing: billingPb.BillingServiceClient;
  jobs: jobPb.JobServiceClient;
  close(): void;
}

export function clients(address: string): Clients {
  const creds = grpc.credentials.createInsecure();
  const users = new userPb.UserServiceClient(address, creds);
  const wallets = new walletPb.WalletServiceClient(address, creds);
  const billing = new billingPb.BillingServiceClient(address, creds);
  const jobs = new jobPb.JobServiceClient(address, creds);
  return {
    users,
    wallets,
    billing,
    jobs,
    close: () => [users, wallets, billing, jobs].forEach((c) => c.close()),
  };
}

type Callback<Res> = (err: grpc.ServiceError | null, res: Res) => void;

/** A unary call through a generated client as a promise: `unary(c.users, 'getUser', { id: 1n })`. */
export function unary<Res>(
  client: grpc.Client,
  method: string,
  request: unknown,
  deadlineMs = 600_000,
): Promise<Res> {
  const fn = (client as unknown as Record<string, Function>)[method];
  return new Promise((resolve, reject) => {
    fn.call(client, request, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, ((err, res) =>
      err ? reject(err) : resolve(res)) as Callback<Res>);
  });
}

export const reasonOf = (err: grpc.ServiceError): string => String(err.metadata?.get('billing-error-reason')[0] ?? '');

// ---------------------------------------------------------------------------
// Seeding (straight SQL on the bench's own connection, after the service migrated)
// ---------------------------------------------------------------------------

/**
 * Users 1..n, each with a wallet holding `balanceMicros` and the CREDIT ledger
 * row that explains it (so balance == credits - debits holds).
 */
export async function seedUsers(db: BenchDb, n: number, balanceMicros: bigint, now = Date.now()): Promise<void> {
  const chunk = 500;
  await db.exec('begin');
  try {
    for (let first = 1; first <= n; first += chunk) {
      const ids: number[] = [];
      for (let id = first; id < first + chunk && id <= n; id++) ids.push(id);
      const no = db.kind === 'postgres' ? 'false' : '0';
      await db.query(
        `insert into users (id, email, name, status, suspension_reason, suspended_for_non_payment, deleted_at, created_at, updated_at) values ${ids
          .map(() => `(?, ?, ?, 'ACTIVE', '', ${no}, null, ?, ?)`)
          .join(', ')}`,
        ids.flatMap((id) => [id, `user${id}@bench.example.com`, `User ${id}`, now, now]),
      );
      await db.query(
        `insert into wallets (user_id, balance, created_at, updated_at) values ${ids.map(() => '(?, ?, ?, ?)').join(', ')}`,
        ids.flatMap((id) => [id, balanceMicros.toString(), now, now]),
      );
      if (balanceMicros > 0n) {
        await db.query(
          `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at) values ${ids
            .map(() => `(?, 'CREDIT', ?, ?, null, null, ?)`)
            .join(', ')}`,
          ids.flatMap((id) => [id, balanceMicros.toString(), balanceMicros.toString(), now]),
        );
      }
    }
    await db.exec('commit');
  } catch (err) {
    await db.exec('rollback').catch(() => undefined);
    throw err;
  }
  if (db.kind === 'postgres') {
    // Seeded with explicit ids: move the identity on so the service's own inserts do not collide.
    await db.query(`select setval(pg_get_serial_sequence('users', 'id'), ?)`, [n]);
  }
}

// ---------------------------------------------------------------------------
// Statistics and tables
// ---------------------------------------------------------------------------

/** Percentile (nearest rank) of an ascending array. */
export function pct(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

export const mb = (bytes: number): number => Math.round((bytes / 1048576) * 10) / 10;
export const round = (x: number, digits = 2): number => (Number.isFinite(x) ? Math.round(x * 10 ** digits) / 10 ** digits : x);

export function table(title: string, rows: Record<string, unknown>[]): string {
  if (rows.length === 0) return `\n${title}\n(no rows)\n`;
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const cell = (v: unknown) => (v === undefined || v === null ? '' : typeof v === 'number' ? String(round(v)) : String(v));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals: string[]) => '| ' + vals.map((v, i) => v.padEnd(widths[i])).join(' | ') + ' |';
  return [
    '',
    title,
    line(cols),
    '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|',
    ...rows.map((r) => line(cols.map((c) => cell(r[c])))),
    '',
  ].join('\n');
}

export function tmpWorkDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'billing-bench-'));
}

/** What a closed loop of calls measured: latencies of the calls that finished (ms, sorted), failures, duration. */
export interface LoopResult {
  latencies: number[];
  errors: number;
  seconds: number;
}

/**
 * A closed loop: `inFlight` workers calling `fn` back to back while `more()`
 * says so; only calls that finished are timed (a failed call counts as an error).
 */
export function closedLoop(inFlight: number, fn: (i: number) => Promise<unknown>, more: () => boolean): { finished(): number; done: Promise<LoopResult> } {
  const latencies: number[] = [];
  let errors = 0;
  let n = 0;
  const t0 = performance.now();
  const done = Promise.all(
    Array.from({ length: inFlight }, async () => {
      while (more()) {
        const i = n++;
        const s = performance.now();
        try {
          await fn(i);
          latencies.push(performance.now() - s);
        } catch {
          errors++;
        }
      }
    }),
  ).then(() => ({ latencies: latencies.sort((a, b) => a - b), errors, seconds: (performance.now() - t0) / 1000 }));
  return { finished: () => latencies.length, done };
}
