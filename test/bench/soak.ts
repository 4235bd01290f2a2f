/**
 * Soak: the built service as a child process on a temporary database, under
 * mixed traffic at high concurrency for a while, with ingestion of a growing
 * usage file every few seconds and real-time retries firing. Then it stops
 * the service (SIGTERM), runs the invariant checker and reports.
 *
 *   npm run soak                                  # 60 s on SQLite
 *   npm run soak -- --seconds 300 --db postgres   # DATABASE_URL, or a fresh database on TEST_PG_ADMIN_URL
 *   options: --seconds N  --db sqlite|postgres  --concurrency N  --clients N  --users N  --max-calls N
 *
 * Exits non-zero when the checker finds a violation, a call ended INTERNAL,
 * or the service did not exit 0. Loopback only; bounded in time and calls.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { Client as PgClient } from 'pg';
import pino from 'pino';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import type * as moneyPb from '../../generated/billing/v1/money';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import type { DatabaseConfig } from '../../src/config';
import { openDatabase } from '../../src/db/database';
import { checkInvariants } from '../../src/ops/invariants';
import { mulberry32 } from '../helpers/prng';

const MAIN = path.resolve(__dirname, '../../src/main.js');
const SERVICES = ['api-calls', 'storage', 'bandwidth', 'compute'];

interface Options {
  seconds: number;
  db: 'sqlite' | 'postgres';
  concurrency: number;
  clients: number;
  users: number;
  maxCalls: number;
}

function options(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      seconds: { type: 'string', default: '60' },
      db: { type: 'string', default: 'sqlite' },
      concurrency: { type: 'string', default: '64' },
      clients: { type: 'string', default: '4' },
      users: { type: 'string', default: '200' },
      'max-calls': { type: 'string', default: '5000000' },
    },
  });
  const num = (name: string, raw: string | undefined, min: number, max: number) => {
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) throw new Error(`--${name} must be a whole number from ${min} to ${max}`);
    return n;
  };
  if (values.db !== 'sqlite' && values.db !== 'postgres') throw new Error('--db must be sqlite or postgres');
  return {
    seconds: num('seconds', values.seconds, 1, 3600),
    db: values.db,
    concurrency: num('concurrency', values.concurrency, 1, 1000),
    clients: num('clients', values.clients, 1, 64),
    users: num('users', values.users, 1, 100_000),
    maxCalls: num('max-calls', values['max-calls'], 1, 100_000_000),
  };
}

const out = (line = '') => process.stdout.write(line + '\n');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const mb = (kb: number) => `${(kb / 1024).toFixed(1)} MB`;


const usd = (units: number, cents = 0): moneyPb.Money => ({ currencyCode: 'USD', units: BigInt(units), nanos: cents * 10_000_000 });

// ---- the database --------------------------------------------------------------

interface Database {
  env: Record<string, string>;
  config: DatabaseConfig;
  describe: string;
  drop(): Promise<void>;
}

async function database(kind: Options['db'], dir: string): Promise<Database> {
  if (kind === 'sqlite') {
    const file = path.join(dir, 'soak.db');
    return { env: { DB_PATH: file }, config: { kind: 'sqlite', path: file }, describe: `SQLite ${file}`, drop: async () => undefined };
  }
  const given = process.env.DATABASE_URL;
  if (given) {
    return { env: { DATABASE_URL: given }, config: { kind: 'postgresql', url: given }, describe: 'PostgreSQL (DATABASE_URL)', drop: async () => undefined };
  }
  const adminUrl = process.env.TEST_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
  const name = `billing_soak_${randomBytes(4).toString('hex')}`;
  const admin = async (sql: string) => {
    const c = new PgClient({ connectionString: adminUrl });
    await c.connect();
    try {
      await c.query(sql);
    } finally {
      await c.end();
    }
  };
  await admin(`create database ${name}`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return {
    env: { DATABASE_URL: url.toString() },
    config: { kind: 'postgresql', url: url.toString() },
    describe: `PostgreSQL ${url.host}/${name} (fresh)`,
    drop: () => admin(`drop database if exists ${name} with (force)`),
  };
}

// ---- the service process ---------------------------------------------------------

interface Service {
  child: ChildProcess;
  port: number;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Log lines at level error (50) or above so far. */
  errorLines(): number;
  /** Last lines of output, for a failure report. */
  tail(): string;
}

function startService(env: Record<string, string>): Promise<Service> {
  const child = spawn(process.execPath, [MAIN], { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let partial = '';
  let tail = '';
  let errors = 0;
  let port = 0;
  let ready!: () => void;
  const isReady = new Promise<void>((resolve) => (ready = resolve));
  const onLine = (line: string) => {
    tail = (tail + line + '\n').slice(-8000);
    if (line.includes('"level":5') || line.includes('"level":6')) errors++;
    if (!port && line.includes('billing-service ready')) {
      port = JSON.parse(line).port;
      ready();
    }
  };
  child.stdout!.on('data', (d: Buffer) => {
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop()!;
    lines.forEach(onLine);
  });
  child.stderr!.on('data', (d: Buffer) => (tail = (tail + d.toString()).slice(-8000)));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  let timer: NodeJS.Timeout | undefined;
  const tooSlow = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`the service did not start within 60 s:\n${tail}`)), 60_000);
  });
  return Promise.race([
    isReady.then(() => ({ child, port, exit, errorLines: () => errors, tail: () => tail })),
    exit.then(({ code }) => Promise.reject(new Error(`the service exited (${code}) before it was ready:\n${tail}`))),
    tooSlow,
  ]).finally(() => clearTimeout(timer));
}

/** VmRSS and VmHWM (peak) of a process, in kB, from /proc (Linux). */
function memoryOf(pid: number): { rss: number; peak: number } | null {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0);
    return { rss: kb('VmRSS'), peak: kb('VmHWM') };
  } catch {
    return null;
  }
}

// ---- clients and statistics ----------------------------------------------------------

interface Clients {
  users: userPb.UserServiceClient;
  wallets: walletPb.WalletServiceClient;
  billing: billingPb.BillingServiceClient;
  jobs: jobPb.JobServiceClient;
  close(): void;
}

function clients(port: number): Clients {
  const address = `127.0.0.1:${port}`;
  const creds = grpc.credentials.createInsecure();
  // Each set gets a connection of its own instead of sharing the global subchannel.
  const opts: grpc.ClientOptions = { 'grpc.use_local_subchannel_pool': 1 };
  const set = {
    users: new userPb.UserServiceClient(address, creds, opts),
    wallets: new walletPb.WalletServiceClient(address, creds, opts),
    billing: new billingPb.BillingServiceClient(address, creds, opts),
    jobs: new jobPb.JobServiceClient(address, creds, opts),
  };
  return { ...set, close: () => Object.values(set).forEach((c) => c.close()) };
}

type Unary<Req, Res> = (
  req: Req,
  md: grpc.Metadata,
  opts: Partial<grpc.CallOptions>,
  cb: (err: grpc.ServiceError | null, res: Res) => void,
) => grpc.ClientUnaryCall;

/** A unary call as a promise with a deadline. */
function unary<Req, Res>(client: grpc.Client, fn: Unary<Req, Res>, req: Req, deadlineMs = 30_000): Promise<Res> {
  return new Promise((resolve, reject) =>
    fn.call(client, req, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

class Stats {
  readonly latencies: number[] = [];
  readonly codes = new Map<string, number>();
  readonly byMethod = new Map<string, { n: number; ms: number[] }>();

  async time<T>(method: string, call: () => Promise<T>): Promise<T | undefined> {
    const started = process.hrtime.bigint();
    let code = 'OK';
    let result: T | undefined;
    try {
      result = await call();
    } catch (err) {
      code = grpc.status[(err as grpc.ServiceError).code] ?? 'CLIENT_ERROR';
    }
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    this.latencies.push(ms);
    this.codes.set(code, (this.codes.get(code) ?? 0) + 1);
    const m = this.byMethod.get(method) ?? { n: 0, ms: [] };
    m.n++;
    m.ms.push(ms);
    this.byMethod.set(method, m);
    return result;
  }

  get total(): number {
    return this.latencies.length;
  }
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

// ---- the run ------------------------------------------------------------------------------

async function soak(opts: Options): Promise<number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-soak-'));
  const db = await database(opts.db, dir);
  const usageFile = path.join(dir, 'usage.ndjson');
  fs.writeFileSync(usageFile, '');
  const rand = mulberry32(20261124);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rand() * xs.length)];
  let failed = false;
  let svc: Service | undefined;
  const sets: Clients[] = [];
  try {
    out(`soak: ${opts.seconds} s, ${opts.concurrency} calls in flight over ${opts.clients} connections, ${opts.users} users, ${db.describe}`);
    svc = await startService({
      GRPC_HOST: '127.0.0.1',
      GRPC_PORT: '0',
      ...db.env,
      LOG_FILE_PATH: usageFile,
      LOG_LEVEL: 'info',
      INGEST_CRON: 'off',
      RETRY_BASE_DELAY_MS: '50',
      MAX_RETRIES: '3',
    });
    const pid = svc.child.pid!;
    const memStart = memoryOf(pid);
    let rssMax = memStart?.rss ?? 0;
    const sampler = setInterval(() => {
      const m = memoryOf(pid);
      if (m) rssMax = Math.max(rssMax, m.rss, m.peak);
    }, 500);
    for (let i = 0; i < opts.clients; i++) sets.push(clients(svc.port));
    const c0 = sets[0];

    // Users: most can pay for a good while, a fifth start (nearly) empty and live on retries and top-ups.
    const userIds: bigint[] = [];
    const seedQueue = Array.from({ length: opts.users }, (_, i) => i);
    await Promise.all(
      Array.from({ length: 16 }, async () => {
        for (let i = seedQueue.shift(); i !== undefined; i = seedQueue.shift()) {
          const { user } = await unary(c0.users, c0.users.createUser, { email: `soak${i}@example.com`, name: `Soak ${i}`, requestId: `seed-u-${i}` });
          userIds.push(user!.id);
          const funds = i % 5 === 0 ? Math.floor(rand() * 5) : 200 + Math.floor(rand() * 800);
          if (funds > 0) await unary(c0.wallets, c0.wallets.addFunds, { userId: user!.id, amount: usd(funds), requestId: `seed-f-${i}` });
        }
      }),
    );
    const memSeeded = memoryOf(pid);

    const stats = new Stats();
    const started = Date.now();
    const deadline = started + opts.seconds * 1000;
    let maxRecordId = 1n;
    const topUps: { userId: bigint; amount: moneyPb.Money; requestId: string }[] = [];
    const more = () => Date.now() < deadline && stats.total < opts.maxCalls;

    const worker = async (w: number) => {
      const c = sets[w % sets.length];
      for (let k = 0; more(); k++) {
        const r = rand();
        const userId = pick(userIds);
        if (r < 0.3) {
          await stats.time('GetBalance', () => unary(c.wallets, c.wallets.getBalance, { userId }));
        } else if (r < 0.45) {
          // One top-up in ten replays an earlier request_id (it must not credit again).
          const replay = topUps.length > 0 && rand() < 0.1;
          const t = replay ? pick(topUps) : { userId, amount: usd(1 + Math.floor(rand() * 50)), requestId: `w${w}-${k}` };
          if (!replay) topUps.push(t);
          await stats.time('AddFunds', () => unary(c.wallets, c.wallets.addFunds, t));
        } else if (r < 0.7) {
          const res = await stats.time('CreateBillingRecord', () =>
            unary(c.billing, c.billing.createBillingRecord, {
              userId,
              amount: usd(Math.floor(rand() * 30), 50),
              description: `soak ${w}-${k}`,
              requestId: rand() < 0.5 ? `r${w}-${k}` : '',
            }),
          );
          const id = res?.billingRecord?.id ?? 0n;
          if (id > maxRecordId) maxRecordId = id;
        } else if (r < 0.85) {
          const id = 1n + BigInt(Math.floor(rand() * Number(maxRecordId)));
          await stats.time('ProcessBillingRecord', () => unary(c.billing, c.billing.processBillingRecord, { id }));
        } else {
          await stats.time('ListBillingRecords', () =>
            unary(c.billing, c.billing.listBillingRecords, { userId, status: 0, pageSize: 20, pageToken: '' }),
          );
        }
      }
    };

    // Every few seconds: append a slice of usage (a few unknown users and bad lines too), then ProcessLogs.
    const ingestions: { ms: number; read: bigint; accepted: bigint; status: string }[] = [];
    let lineNo = 0;
    const ingestLoop = async () => {
      while (more()) {
        const lines: string[] = [];
        for (let i = 0; i < 2000; i++, lineNo++) {
          const r = rand();
          const entry = {
            id: `soak-${lineNo}`,
            userId: r < 0.02 ? 999_999 : Number(pick(userIds)),
            service: r > 0.99 ? 'gpu' : pick(SERVICES),
            quantity: 1 + Math.floor(rand() * 20),
            timestamp: new Date(Date.now() - Math.floor(rand() * 86_400_000)).toISOString(),
          };
          lines.push(r > 0.985 ? `{"userId": ${entry.userId}, "service":` : JSON.stringify(entry));
        }
        fs.appendFileSync(usageFile, lines.join('\n') + '\n');
        const t0 = Date.now();
        const res = await stats.time('ProcessLogs', () => unary(c0.jobs, c0.jobs.processLogs, {}, 120_000));
        if (res?.jobRun) {
          ingestions.push({ ms: Date.now() - t0, read: res.jobRun.entriesRead, accepted: res.jobRun.entriesAccepted, status: jobPb.JobRunStatus[res.jobRun.status] });
        }
        const pause = Date.now() + 3000;
        while (more() && Date.now() < pause) await sleep(100);
      }
    };

    await Promise.all([...Array.from({ length: opts.concurrency }, (_, w) => worker(w)), ingestLoop()]);
    const elapsed = (Date.now() - started) / 1000;
    const memEnd = memoryOf(pid);

    // Let the retries scheduled by now run out (3 retries, 50/100/200 ms apart), then stop.
    for (let i = 0; i < 300; i++) {
      const { billingRecords } = await unary(c0.billing, c0.billing.listBillingRecords, {
        userId: 0n,
        status: billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PENDING,
        pageSize: 1,
        pageToken: '',
      });
      if (billingRecords.length === 0) break;
      await unary(c0.jobs, c0.jobs.processRetries, {}, 120_000);
      await sleep(100);
    }
    clearInterval(sampler);
    const peak = Math.max(rssMax, memoryOf(pid)?.peak ?? 0);
    sets.forEach((s) => s.close());
    svc.child.kill('SIGTERM');
    const exit = await svc.exit;

    // ---- report ----
    const sorted = Float64Array.from(stats.latencies).sort();
    const arr = Array.from(sorted);
    out();
    out(`calls: ${stats.total} in ${elapsed.toFixed(1)} s = ${(stats.total / elapsed).toFixed(0)} calls/s`);
    out(`latency (all calls): p50 ${percentile(arr, 50).toFixed(1)} ms, p90 ${percentile(arr, 90).toFixed(1)} ms, p99 ${percentile(arr, 99).toFixed(1)} ms, max ${arr[arr.length - 1]?.toFixed(1) ?? 0} ms`);
    for (const [method, m] of [...stats.byMethod].sort()) {
      const s = m.ms.sort((a, b) => a - b);
      out(`  ${method.padEnd(22)} ${String(m.n).padStart(8)} calls  p50 ${percentile(s, 50).toFixed(1).padStart(7)} ms  p99 ${percentile(s, 99).toFixed(1).padStart(8)} ms`);
    }
    out(`status codes: ${[...stats.codes].sort().map(([code, n]) => `${code} ${n}`).join(', ')}`);
    const ing = ingestions.map((i) => i.ms).sort((a, b) => a - b);
    out(
      `ingestion: ${ingestions.length} ProcessLogs runs (${ingestions.filter((i) => i.status !== 'JOB_RUN_STATUS_SUCCEEDED').length} not SUCCEEDED), ` +
        `${lineNo} lines appended, last run read ${ingestions.at(-1)?.read ?? 0n}, p50 ${percentile(ing, 50)} ms, max ${ing.at(-1) ?? 0} ms`,
    );
    out(
      `service RSS: start ${mb(memStart?.rss ?? 0)}, after seeding ${mb(memSeeded?.rss ?? 0)}, end of traffic ${mb(memEnd?.rss ?? 0)}, peak ${mb(peak)}`,
    );
    out(`service: ${svc.errorLines()} error log lines; exit ${exit.code ?? exit.signal}`);

    const side = await openDatabase(db.config, pino({ level: 'silent' }), { migrate: false });
    try {
      const report = await checkInvariants(side);
      const c = report.counts;
      out(
        `database: ${c.users} users, ${c.credits} credits, ${c.debits} debits, records ${c.billingRecords.PAID} PAID / ` +
          `${c.billingRecords.PENDING} PENDING / ${c.billingRecords.FAILED} FAILED, usage ${c.usageLogs.BILLED} BILLED / ` +
          `${c.usageLogs.PENDING} PENDING / ${c.usageLogs.REJECTED} REJECTED`,
      );
      if (report.ok) {
        out('invariants: OK');
      } else {
        failed = true;
        out(`invariants: ${report.violations.length} VIOLATIONS`);
        for (const v of report.violations.slice(0, 50)) out(`  ${v.rule}: ${v.detail}`);
      }
    } finally {
      await side.close();
    }
    if ((stats.codes.get('INTERNAL') ?? 0) > 0) {
      failed = true;
      out(`FAILED: ${stats.codes.get('INTERNAL')} calls ended INTERNAL`);
    }
    if (exit.code !== 0) {
      failed = true;
      out(`FAILED: the service exited with ${exit.code ?? exit.signal}\n${svc.tail()}`);
    }
    out(failed ? 'soak: FAILED' : 'soak: PASSED');
    return failed ? 1 : 0;
  } finally {
    sets.forEach((s) => s.close());
    if (svc && svc.child.exitCode === null && svc.child.signalCode === null) {
      svc.child.kill('SIGKILL');
      await svc.exit;
    }
    await db.drop().catch(() => undefined);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

soak(options(process.argv.slice(2))).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    process.stderr.write(`soak: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exitCode = 2;
  },
);
