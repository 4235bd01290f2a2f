/**
 * Part 2, RPC throughput and latency.
 *
 * h2load (a C HTTP/2 client, so the client is not the bottleneck) sends
 * prepared gRPC frames at 1, 16 and 128 in flight for a fixed time, against
 * the service and, in the same run, against a trivial grpc-js handler
 * (trivial-server.ts); the ratio is calls/s over the trivial handler's at the
 * same concurrency. On SQLite a floor server (floor-server.ts: the same SQL
 * with raw better-sqlite3 behind grpc-js) is measured the same way for
 * GetBalance and AddFunds (ratioToFloor). h2load only sees HTTP 200, so every body is first sent
 * through a grpc-js client to check it really succeeds (grpc-status 0, or the
 * documented status for the cheap paths), and write RPCs are cross-checked
 * against the rows they must have written.
 *
 * The project's own grpc-js client then measures latency at 1 and 16 in
 * flight, including the paths one repeated body cannot exercise: CreateUser
 * with fresh emails and ProcessBillingRecord charging a PENDING record.
 */
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import {
  clients,
  closedLoop,
  freshDb,
  startHelper,
  log,
  paths,
  pct,
  reasonOf,
  round,
  seedUsers,
  sleep,
  startService,
  unary,
  type BenchDb,
  type BenchOptions,
  type ServiceProcess,
} from './common';
import { FLOOR_ADD_FUNDS, FLOOR_GET_BALANCE } from './floor-server';
import { TRIVIAL_PATH } from './trivial-server';

const LEVELS: { inFlight: number; c: number; m: number }[] = [
  { inFlight: 1, c: 1, m: 1 },
  { inFlight: 16, c: 4, m: 4 },
  { inFlight: 128, c: 8, m: 16 },
];
const USERS = 1000;
const FUNDS = 10_000_000n * 1_000_000n;

export interface H2Row {
  rpc: string;
  path: string;
  inFlight: number;
  callsPerS: number;
  p50Ms: number;
  p99Ms: number;
  failed: number;
  trivialCallsPerS?: number;
  ratio?: number;
  /** calls/s over the raw-driver floor server's for the same RPC and concurrency. */
  ratioToFloor?: number;
  check?: string;
}

export interface ClientRow {
  rpc: string;
  inFlight: number;
  calls: number;
  callsPerS: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  ratio?: number;
}

// ---------------------------------------------------------------------------
// h2load
// ---------------------------------------------------------------------------

/** h2load on PATH, installing nghttp2-client if needed; null (with the reason) when impossible. */
export function ensureH2load(notes: string[]): string | null {
  const which = () => {
    try {
      return execFileSync('sh', ['-c', 'command -v h2load'], { encoding: 'utf8' }).trim() || null;
    } catch {
      return null;
    }
  };
  let found = which();
  if (found) return found;
  const apt = (args: string[]) => {
    try {
      execFileSync('apt-get', args, { stdio: 'ignore', timeout: 300_000 });
      return true;
    } catch {
      return false;
    }
  };
  log('h2load not found: apt-get install -y nghttp2-client');
  if (!apt(['install', '-y', 'nghttp2-client'])) {
    apt(['update']);
    apt(['install', '-y', 'nghttp2-client']);
  }
  found = which();
  if (!found) notes.push('SKIPPED the h2load runs: h2load is not on PATH and `apt-get install -y nghttp2-client` failed');
  return found;
}

/** A gRPC request body: 5-byte frame header (uncompressed, big-endian length) + the message. */
export function grpcFrame(message: Uint8Array): Buffer {
  const header = Buffer.alloc(5);
  header.writeUInt8(0, 0);
  header.writeUInt32BE(message.length, 1);
  return Buffer.concat([header, Buffer.from(message)]);
}

interface H2Result {
  callsPerS: number;
  succeeded: number;
  failed: number;
  p50Ms: number;
  p99Ms: number;
  latencies: number[];
}

function runH2load(bin: string, url: string, body: string, c: number, m: number, seconds: number, logFile: string): Promise<H2Result> {
  const args = [
    '-D', String(seconds),
    '--warm-up-time', '1',
    '-c', String(c),
    '-m', String(m),
    '-t', '1',
    '-H', 'content-type: application/grpc',
    '-H', 'te: trailers',
    '-d', body,
    '--log-file', logFile,
    url,
  ];
  return new Promise((resolve, reject) => {
    execFile(bin, args, { maxBuffer: 16 << 20, timeout: (seconds + 60) * 1000 }, (err, stdout) => {
      if (err) return reject(new Error(`h2load failed: ${err.message}\n${stdout}`));
      const rate = /finished in [\d.]+m?s, ([\d.]+) req\/s/.exec(stdout);
      const req = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(stdout);
      if (!rate || !req) return reject(new Error(`cannot read h2load output:\n${stdout}`));
      const latencies = fs
        .readFileSync(logFile, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => Number(l.split('\t')[2]) / 1000)
        .sort((a, b) => a - b);
      fs.rmSync(logFile, { force: true });
      resolve({
        callsPerS: Number(rate[1]),
        succeeded: Number(req[4]),
        failed: Number(req[5]) + Number(req[6]) + Number(req[7]),
        p50Ms: pct(latencies, 50),
        p99Ms: pct(latencies, 99),
        latencies,
      });
    });
  });
}

/** One h2load per target in parallel (replicas), summed. */
async function h2loadAll(bin: string, ports: number[], rpcPath: string, body: string, c: number, m: number, seconds: number, dir: string): Promise<H2Result> {
  const results = await Promise.all(
    ports.map((port, i) => runH2load(bin, `http://127.0.0.1:${port}${rpcPath}`, body, c, m, seconds, path.join(dir, `h2-${port}-${i}.log`))),
  );
  const latencies = results.flatMap((r) => r.latencies).sort((a, b) => a - b);
  return {
    callsPerS: results.reduce((s, r) => s + r.callsPerS, 0),
    succeeded: results.reduce((s, r) => s + r.succeeded, 0),
    failed: results.reduce((s, r) => s + r.failed, 0),
    p50Ms: pct(latencies, 50),
    p99Ms: pct(latencies, 99),
    latencies: [],
  };
}

// ---------------------------------------------------------------------------
// Raw grpc-js calls (the same bytes h2load sends)
// ---------------------------------------------------------------------------

const identity = (b: Buffer) => b;

function rawCall(client: grpc.Client, rpcPath: string, message: Buffer): Promise<{ code: grpc.status; reason: string; response?: Buffer }> {
  return new Promise((resolve) => {
    client.makeUnaryRequest(rpcPath, identity, identity, message, new grpc.Metadata(), { deadline: Date.now() + 30_000 }, (err, res) =>
      resolve(err ? { code: err.code, reason: reasonOf(err) } : { code: grpc.status.OK, reason: '', response: res }),
    );
  });
}

/** Closed loop: `concurrency` workers calling `fn` until `seconds` are up. */
async function timedLoop(concurrency: number, seconds: number, fn: (i: number) => Promise<unknown>): Promise<Omit<ClientRow, 'rpc' | 'inFlight'>> {
  const end = performance.now() + seconds * 1000;
  const { latencies, errors, seconds: elapsed } = await closedLoop(concurrency, fn, () => performance.now() < end).done;
  return { calls: latencies.length, callsPerS: Math.round(latencies.length / elapsed), p50Ms: round(pct(latencies, 50), 3), p99Ms: round(pct(latencies, 99), 3), errors };
}

// ---------------------------------------------------------------------------

/**
 * PENDING manual records, not scheduled (next_attempt_at null), for the real
 * charge path; they belong to the upper half of the users, so AddFunds on the
 * lower half has nothing to settle.
 */
async function seedPendingRecords(db: BenchDb, n: number, users: number): Promise<number[]> {
  const now = Date.now();
  const rows = await db.query<{ m: number | string | null }>('select max(id) as m from billing_records');
  const first = Number(rows[0].m ?? 0) + 1;
  const ids: number[] = [];
  await db.exec('begin');
  for (let start = 0; start < n; start += 500) {
    const chunk: number[] = [];
    for (let k = start; k < Math.min(n, start + 500); k++) chunk.push(first + k);
    await db.query(
      `insert into billing_records (id, user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, created_at, updated_at)
       values ${chunk.map(() => `(?, ?, 'MANUAL', 10000, 'PENDING', 'bench charge', 0, null, '', ?, ?)`).join(', ')}`,
      chunk.flatMap((id) => [id, users / 2 + 1 + (id % (users / 2)), now, now]),
    );
    ids.push(...chunk);
  }
  await db.exec('commit');
  if (db.kind === 'postgres') await db.query(`select setval(pg_get_serial_sequence('billing_records', 'id'), ?)`, [first + n]);
  return ids;
}

export async function runRpc(opts: BenchOptions): Promise<{ h2load: H2Row[]; client: ClientRow[]; notes: string[] }> {
  const notes: string[] = [];
  const h2: H2Row[] = [];
  const clientRows: ClientRow[] = [];
  const bin = ensureH2load(notes);
  const seconds = opts.rpcSeconds;

  const db = await freshDb(opts, 'rpc');
  // Retries far in the future: nothing fires by itself during the runs.
  const env = { ...db.env, RETRY_BASE_DELAY_MS: '86400000' };
  const services: ServiceProcess[] = [];
  const trivial = await startHelper('trivial-server.js');
  let floor: { port: number; stop(): Promise<void> } | null = null;
  try {
    services.push(await startService(opts, env, 'rpc-0'));
    for (let i = 1; i < opts.replicas; i++) services.push(await startService(opts, env, `rpc-${i}`));
    const ports = services.map((s) => s.port);
    await seedUsers(db, USERS + 1, FUNDS);
    const shortUser = USERS + 1;
    await db.query('update wallets set balance = 0 where user_id = ?', [shortUser]);
    await db.query('delete from wallet_transactions where user_id = ?', [shortUser]);
    const c = clients(services[0].address);
    const raw = new grpc.Client(services[0].address, grpc.credentials.createInsecure());
    const trivialRaw = new grpc.Client(`127.0.0.1:${trivial.port}`, grpc.credentials.createInsecure());
    try {
      // A PAID record (ALREADY_PAID path) and a FAILED one (each call is a real, failing charge attempt).
      const paid = await unary<billingPb.CreateBillingRecordResponse>(c.billing, 'createBillingRecord', {
        userId: 1n, amount: { currencyCode: 'USD', units: 1n, nanos: 0 }, description: 'bench paid', requestId: '',
      });
      const failed = await unary<billingPb.CreateBillingRecordResponse>(c.billing, 'createBillingRecord', {
        userId: BigInt(shortUser), amount: { currencyCode: 'USD', units: 1n, nanos: 0 }, description: 'bench short', requestId: '',
      });
      const failedId = failed.billingRecord!.id;
      for (let i = 0; i < 6; i++) {
        const r = await unary<billingPb.ProcessBillingRecordResponse>(c.billing, 'processBillingRecord', { id: failedId });
        if (r.billingRecord!.status === billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_FAILED) break;
      }

      const bodies: { rpc: string; path: string; message: Buffer; expect: string; check?: () => Promise<number> }[] = [
        {
          rpc: 'GetBalance',
          path: '/billing.v1.WalletService/GetBalance',
          message: Buffer.from(walletPb.GetBalanceRequest.encode({ userId: 1n }).finish()),
          expect: 'OK',
        },
        {
          rpc: 'AddFunds',
          path: '/billing.v1.WalletService/AddFunds',
          message: Buffer.from(
            walletPb.AddFundsRequest.encode({ userId: 2n, amount: { currencyCode: 'USD', units: 1n, nanos: 0 }, requestId: '' }).finish(),
          ),
          expect: 'OK',
          check: async () => Number((await db.query<{ n: number | string }>(`select count(*) as n from wallet_transactions where user_id = 2 and type = 'CREDIT'`))[0].n),
        },
        {
          rpc: 'CreateUser (email taken)',
          path: '/billing.v1.UserService/CreateUser',
          message: Buffer.from(userPb.CreateUserRequest.encode({ email: 'user1@bench.example.com', name: 'Taken', requestId: '' }).finish()),
          expect: 'ALREADY_EXISTS/EMAIL_TAKEN',
        },
        {
          rpc: 'ProcessBillingRecord (PAID)',
          path: '/billing.v1.BillingService/ProcessBillingRecord',
          message: Buffer.from(billingPb.ProcessBillingRecordRequest.encode({ id: paid.billingRecord!.id }).finish()),
          expect: 'OK',
        },
        {
          rpc: 'ProcessBillingRecord (FAILED, short)',
          path: '/billing.v1.BillingService/ProcessBillingRecord',
          message: Buffer.from(billingPb.ProcessBillingRecordRequest.encode({ id: failedId }).finish()),
          expect: 'OK',
          check: async () => Number((await db.query<{ n: number | string }>('select attempt_count as n from billing_records where id = ?', [Number(failedId)]))[0].n),
        },
      ];

      // Each body must really succeed (or fail the documented way) through a grpc-js client first.
      for (const b of bodies) {
        const r = await rawCall(raw, b.path, b.message);
        const got = r.code === grpc.status.OK ? 'OK' : `${grpc.status[r.code]}/${r.reason}`;
        if (got !== b.expect) throw new Error(`${b.rpc}: the h2load body answers ${got}, expected ${b.expect}`);
      }
      const t = await rawCall(trivialRaw, TRIVIAL_PATH, bodies[0].message);
      if (t.code !== grpc.status.OK) throw new Error('trivial server does not answer');

      if (bin) {
        const dir = opts.workDir;
        const trivialBody = path.join(dir, 'trivial.bin');
        fs.writeFileSync(trivialBody, grpcFrame(bodies[0].message));
        const trivialRate = new Map<number, H2Result>();
        for (const level of LEVELS) {
          // The trivial handler gets as many targets as the service has replicas (one process each would need as many cores).
          const r = await h2loadAll(bin, ports.map(() => trivial.port), TRIVIAL_PATH, trivialBody, level.c, level.m, seconds, dir);
          trivialRate.set(level.inFlight, r);
          h2.push({ rpc: 'trivial grpc-js handler', path: TRIVIAL_PATH, inFlight: level.inFlight, callsPerS: Math.round(r.callsPerS), p50Ms: round(r.p50Ms, 3), p99Ms: round(r.p99Ms, 3), failed: r.failed, ratio: 1 });
          log(`h2load trivial @${level.inFlight}: ${Math.round(r.callsPerS)}/s`);
        }
        const floorRate = new Map<string, number>();
        if (db.file) {
          // The same SQL with raw better-sqlite3 behind grpc-js: what this driver allows (user 3, untouched otherwise).
          floor = await startHelper('floor-server.js', [db.file]);
          const floorBodies = [
            { rpc: 'GetBalance', path: FLOOR_GET_BALANCE, message: walletPb.GetBalanceRequest.encode({ userId: 3n }).finish() },
            { rpc: 'AddFunds', path: FLOOR_ADD_FUNDS, message: walletPb.AddFundsRequest.encode({ userId: 3n, amount: { currencyCode: 'USD', units: 1n, nanos: 0 }, requestId: '' }).finish() },
          ];
          for (const f of floorBodies) {
            const file = path.join(dir, `floor-${f.rpc}.bin`);
            fs.writeFileSync(file, grpcFrame(f.message));
            const floorClient = new grpc.Client(`127.0.0.1:${floor.port}`, grpc.credentials.createInsecure());
            const check = await rawCall(floorClient, f.path, Buffer.from(f.message));
            floorClient.close();
            if (check.code !== grpc.status.OK) throw new Error(`floor ${f.rpc} answers ${grpc.status[check.code]}`);
            for (const level of LEVELS) {
              const r = await h2loadAll(bin, [floor.port], f.path, file, level.c, level.m, seconds, dir);
              const triv = trivialRate.get(level.inFlight)!;
              floorRate.set(`${f.rpc}@${level.inFlight}`, r.callsPerS);
              h2.push({ rpc: `floor: raw better-sqlite3 ${f.rpc}`, path: f.path, inFlight: level.inFlight, callsPerS: Math.round(r.callsPerS), p50Ms: round(r.p50Ms, 3), p99Ms: round(r.p99Ms, 3), failed: r.failed, trivialCallsPerS: Math.round(triv.callsPerS), ratio: round(r.callsPerS / triv.callsPerS, 3) });
              log(`h2load floor ${f.rpc} @${level.inFlight}: ${Math.round(r.callsPerS)}/s`);
            }
          }
          await floor.stop();
          floor = null;
        }
        for (const b of bodies) {
          const file = path.join(dir, `${b.rpc.replace(/\W+/g, '_')}.bin`);
          fs.writeFileSync(file, grpcFrame(b.message));
          for (const level of LEVELS) {
            const before = b.check ? await b.check() : 0;
            const r = await h2loadAll(bin, ports, b.path, file, level.c, level.m, seconds, dir);
            const triv = trivialRate.get(level.inFlight)!;
            const row: H2Row = {
              rpc: b.rpc,
              path: b.path,
              inFlight: level.inFlight,
              callsPerS: Math.round(r.callsPerS),
              p50Ms: round(r.p50Ms, 3),
              p99Ms: round(r.p99Ms, 3),
              failed: r.failed,
              trivialCallsPerS: Math.round(triv.callsPerS),
              ratio: round(r.callsPerS / triv.callsPerS, 3),
              check: b.expect,
            };
            const floorCalls = floorRate.get(`${b.rpc}@${level.inFlight}`);
            if (floorCalls) row.ratioToFloor = round(r.callsPerS / floorCalls, 3);
            if (b.check) {
              // h2load's count includes the warm-up second's calls; the rows written must match every call it sent.
              const written = (await b.check()) - before;
              row.check = `${b.expect}; rows written ${written} vs h2load calls >= ${r.succeeded}`;
              if (written < r.succeeded) row.check += ' MISMATCH';
            }
            h2.push(row);
            log(`h2load ${b.rpc} @${level.inFlight}: ${row.callsPerS}/s (x${row.ratio})`);
            await sleep(200);
          }
        }
      }

      // grpc-js client: latency at low concurrency, and the paths one body cannot repeat.
      const clientSeconds = Math.max(2, Math.round(seconds / 2));
      const pending = await seedPendingRecords(db, 60_000, USERS);
      let nextPending = 0;
      let emailSeq = 0;
      const calls: { rpc: string; fn: (i: number) => Promise<unknown> }[] = [
        { rpc: 'trivial grpc-js handler', fn: () => rawCall(trivialRaw, TRIVIAL_PATH, bodies[0].message).then((r) => { if (r.code) throw new Error(); }) },
        { rpc: 'GetBalance', fn: (i) => unary(c.wallets, 'getBalance', { userId: BigInt(1 + (i % (USERS / 2))) }) },
        { rpc: 'AddFunds', fn: (i) => unary(c.wallets, 'addFunds', { userId: BigInt(1 + (i % (USERS / 2))), amount: { currencyCode: 'USD', units: 1n, nanos: 0 }, requestId: '' }) },
        { rpc: 'CreateUser (new email)', fn: () => unary(c.users, 'createUser', { email: `load${emailSeq++}@bench.example.com`, name: 'Load', requestId: `u-${emailSeq}` }) },
        {
          rpc: 'ProcessBillingRecord (charge)',
          fn: async () => {
            const id = pending[nextPending++];
            if (id === undefined) throw new Error('out of pending records');
            const r = await unary<billingPb.ProcessBillingRecordResponse>(c.billing, 'processBillingRecord', { id: BigInt(id) });
            if (r.outcome !== billingPb.ChargeOutcome.CHARGE_OUTCOME_CHARGED) throw new Error('not charged');
          },
        },
      ];
      const trivialClient = new Map<number, number>();
      for (const call of calls) {
        for (const inFlight of [1, 16]) {
          const r = await timedLoop(inFlight, clientSeconds, call.fn);
          if (call.rpc.startsWith('trivial')) trivialClient.set(inFlight, r.callsPerS);
          clientRows.push({ rpc: call.rpc, inFlight, ...r, ratio: round(r.callsPerS / (trivialClient.get(inFlight) ?? NaN), 3) });
          log(`client ${call.rpc} @${inFlight}: ${r.callsPerS}/s p50 ${r.p50Ms} ms p99 ${r.p99Ms} ms errors ${r.errors}`);
        }
      }
      if (nextPending >= pending.length) notes.push('ProcessBillingRecord (charge) ran out of seeded PENDING records; its figures are cut short');
    } finally {
      raw.close();
      trivialRaw.close();
      c.close();
    }
  } finally {
    await trivial.stop();
    await floor?.stop();
    for (const s of services) await s.stop();
    await db.drop();
  }
  return { h2load: h2, client: clientRows, notes };
}
