/**
 * What the service process writes to its log for RPCs, as an operator sees
 * it (stdout of the built service): quiet for reads and refused calls at the
 * default settings, one line per money-moving call, one line per call of any
 * kind with ACCESS_LOG=true; never a token.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { bearer, call, money } from '../helpers/harness';
import { killServiceProcesses, startServiceProcess, type ServiceProcess } from '../helpers/service-process';

const SERVICE_TOKEN = randomBytes(32).toString('hex');
const OPERATOR_TOKEN = randomBytes(32).toString('hex');
const asService = { metadata: bearer(SERVICE_TOKEN) };
const asOperator = { metadata: bearer(OPERATOR_TOKEN) };

type Line = Record<string, unknown>;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('RPC logging of the service process', () => {
  let dir: string;
  let db: TestDatabase;
  let svc: ServiceProcess | undefined;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-log-'));
    db = await createTestDatabase(dir);
    fs.writeFileSync(
      path.join(dir, 'tokens.json'),
      JSON.stringify([
        { name: 'checkout', token: SERVICE_TOKEN, role: 'service' },
        { name: 'ops-alice', token: OPERATOR_TOKEN, role: 'operator' },
      ]),
      { mode: 0o600 },
    );
  });
  afterEach(async () => {
    svc?.close();
    svc = undefined;
    await killServiceProcesses();
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** The service with authentication on; `env` adds or overrides settings (the rest are the defaults). */
  async function serve(env: Record<string, string> = {}): Promise<ServiceProcess> {
    svc = await startServiceProcess({
      GRPC_PORT: '0',
      ...db.env,
      INGEST_CRON: 'off',
      LOG_FILE_PATH: path.join(dir, 'usage.ndjson'),
      AUTH_TOKENS_FILE: path.join(dir, 'tokens.json'),
      ...env,
    });
    return svc;
  }

  /** The JSON log lines written after `offset` characters of output. */
  const linesAfter = (s: ServiceProcess, offset: number): Line[] =>
    s
      .output()
      .slice(offset)
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as Line);

  /**
   * Waits until a line after `offset` matches, and returns every line after `offset` up to and including it.
   * stdout is one ordered stream, so whatever the calls before it logged has arrived too.
   */
  async function linesUntil(s: ServiceProcess, offset: number, match: (l: Line) => boolean): Promise<Line[]> {
    const deadline = Date.now() + 15_000;
    for (;;) {
      const lines = linesAfter(s, offset);
      const at = lines.findIndex(match);
      if (at >= 0) return lines.slice(0, at + 1);
      if (Date.now() > deadline) throw new Error(`no matching log line within 15 s; output:\n${s.output().slice(offset)}`);
      await sleep(20);
    }
  }

  /**
   * The output offset just past the first line that matches, once it has arrived. A response can reach the test
   * before the line its call logged has come through the pipe, so a test waits for that line before counting.
   */
  async function offsetPast(s: ServiceProcess, match: (l: Line) => boolean): Promise<number> {
    const [line] = (await linesUntil(s, 0, match)).slice(-1);
    const text = JSON.stringify(line);
    const out = s.output();
    // Lines are found again by content: the first whole line that parses to the same object.
    let at = 0;
    for (const raw of out.split('\n')) {
      at += raw.length + 1;
      if (raw.startsWith('{') && JSON.stringify(JSON.parse(raw)) === text) return at;
    }
    throw new Error('matched line not found again');
  }

  /** 200 GetBalance, 50 refused calls (25 unknown tokens, 25 a role may not make) and 20 invalid reads. */
  async function quietTraffic(s: ServiceProcess, userId: bigint): Promise<void> {
    for (let round = 0; round < 10; round++) {
      await Promise.all(Array.from({ length: 20 }, () => call(s.wallets, 'getBalance', { userId }, asService)));
    }
    const refused = [
      ...Array.from({ length: 25 }, () =>
        call(s.wallets, 'getBalance', { userId }, { metadata: bearer(randomBytes(32).toString('hex')) }),
      ),
      ...Array.from({ length: 25 }, () => call(s.users, 'suspendUser', { id: userId, reason: 'nope' }, asService)),
      ...Array.from({ length: 10 }, () => call(s.users, 'getUser', { id: 0n }, asService)), // INVALID_ARGUMENT
      ...Array.from({ length: 10 }, () => call(s.users, 'getUser', { id: 987_654n }, asService)), // NOT_FOUND
    ];
    const codes = await Promise.all(refused.map((p) => p.then(() => 'OK', (err: grpc.ServiceError) => grpc.status[err.code])));
    expect(codes.filter((c) => c === 'UNAUTHENTICATED')).toHaveLength(25);
    expect(codes.filter((c) => c === 'PERMISSION_DENIED')).toHaveLength(25);
    expect(codes.filter((c) => c === 'INVALID_ARGUMENT')).toHaveLength(10);
    expect(codes.filter((c) => c === 'NOT_FOUND')).toHaveLength(10);
  }

  const isAddFunds = (l: Line) => l.msg === 'rpc' && l.method === 'AddFunds';
  /** How many lines there are of each "msg method code" (level in brackets). */
  const tally = (lines: Line[]) => {
    const counted: Record<string, number> = {};
    for (const l of lines) {
      const key = [l.msg, l.method, l.code, `(${String(l.level)})`].filter((k) => k !== undefined).join(' ');
      counted[key] = (counted[key] ?? 0) + 1;
    }
    return counted;
  };
  const summary = (l: Line) => ({ level: l.level, msg: l.msg, method: l.method, code: l.code, caller: l.caller });

  it('at the default settings, reads and refused calls write no line and an AddFunds writes one naming the method and caller', async () => {
    const s = await serve();
    const { user } = await call(s.users, 'createUser', { email: 'quiet@example.com', name: 'Q', requestId: '' }, asService);
    const offset = await offsetPast(s, (l) => l.msg === 'rpc' && l.method === 'CreateUser');

    await quietTraffic(s, user!.id);
    await call(s.wallets, 'addFunds', { userId: user!.id, amount: money('5'), requestId: 'top-1' }, asService);

    const lines = await linesUntil(s, offset, isAddFunds);
    expect(tally(lines)).toEqual({ 'rpc AddFunds OK (30)': 1 });
    expect(summary(lines[0])).toEqual({ level: 30, msg: 'rpc', method: 'AddFunds', code: 'OK', caller: 'checkout' });
    expect(typeof lines[0].durationMs).toBe('number');

    // Job runs and charges stay logged: a ProcessLogs that bills one record.
    fs.writeFileSync(
      path.join(dir, 'usage.ndjson'),
      `${JSON.stringify({ userId: Number(user!.id), service: 'api-calls', quantity: 100, timestamp: '2024-01-15T10:00:00Z' })}\n`,
    );
    const before = await offsetPast(s, isAddFunds);
    await call(s.jobs, 'processLogs', {}, asOperator);
    const jobLines = await linesUntil(s, before, (l) => l.msg === 'rpc' && l.method === 'ProcessLogs');
    expect(jobLines.map((l) => l.msg)).toEqual(['ingestion run sealed', 'charge attempts (batch)', 'job run finished', 'rpc']);
    expect(jobLines[0]).toMatchObject({ level: 30, records: 1 });
    expect(typeof jobLines[0].longestSealTxMs).toBe('number');
    expect(jobLines[1]).toMatchObject({ level: 30, trigger: 'new', records: 1, chargesSucceeded: 1 });
    expect(typeof jobLines[1].ms).toBe('number');
    expect(jobLines[2]).toMatchObject({ level: 30, kind: 'PROCESS_LOGS', status: 'SUCCEEDED', chargesSucceeded: 1 });
    expect(summary(jobLines[3])).toEqual({ level: 30, msg: 'rpc', method: 'ProcessLogs', code: 'OK', caller: 'ops-alice' });

    expect(s.output()).not.toContain(SERVICE_TOKEN);
    expect(s.output()).not.toContain(OPERATOR_TOKEN);
  });

  it('with ACCESS_LOG=true every call writes one line, refused and invalid ones included', async () => {
    const s = await serve({ ACCESS_LOG: 'true' });
    const { user } = await call(s.users, 'createUser', { email: 'loud@example.com', name: 'L', requestId: '' }, asService);
    const offset = await offsetPast(s, (l) => l.msg === 'rpc' && l.method === 'CreateUser');

    await quietTraffic(s, user!.id);
    await call(s.wallets, 'addFunds', { userId: user!.id, amount: money('5'), requestId: 'top-1' }, asService);

    const lines = await linesUntil(s, offset, isAddFunds);
    expect(tally(lines)).toEqual({
      'rpc GetBalance OK (30)': 200,
      'rpc GetBalance UNAUTHENTICATED (30)': 25,
      'rpc SuspendUser PERMISSION_DENIED (30)': 25,
      'rpc GetUser INVALID_ARGUMENT (30)': 10,
      'rpc GetUser NOT_FOUND (30)': 10,
      'rpc AddFunds OK (30)': 1,
    });
    // Every admitted call, and a refused one whose token was valid, names its caller.
    expect(lines.filter((l) => l.code !== 'UNAUTHENTICATED').every((l) => l.caller === 'checkout')).toBe(true);
    expect(s.output()).not.toContain(SERVICE_TOKEN);
    expect(s.output()).not.toContain(OPERATOR_TOKEN);
  });

  it('with LOG_LEVEL=debug a batch of charges also writes each record charged, at debug', async () => {
    const s = await serve({ LOG_LEVEL: 'debug' });
    const ids: number[] = [];
    for (const [i, funds] of ['5', '0'].entries()) {
      const { user } = await call(s.users, 'createUser', { email: `each-${i}@example.com`, name: 'E', requestId: '' }, asService);
      if (funds !== '0') await call(s.wallets, 'addFunds', { userId: user!.id, amount: money(funds), requestId: `each-${i}` }, asService);
      ids.push(Number(user!.id));
    }
    fs.writeFileSync(
      path.join(dir, 'usage.ndjson'),
      ids.map((userId) => `${JSON.stringify({ userId, service: 'api-calls', quantity: 100, timestamp: '2024-01-15T10:00:00Z' })}\n`).join(''),
    );
    const before = await offsetPast(s, isAddFunds);
    await call(s.jobs, 'processLogs', {}, asOperator);
    const lines = await linesUntil(s, before, (l) => l.msg === 'rpc' && l.method === 'ProcessLogs');
    const each = lines.filter((l) => l.msg === 'charge attempt');
    expect(each.map((l) => ({ level: l.level, trigger: l.trigger, outcome: l.outcome }))).toEqual([
      { level: 20, trigger: 'new', outcome: 'CHARGED' },
      { level: 20, trigger: 'new', outcome: 'RETRY_SCHEDULED' },
    ]);
    expect(lines.find((l) => l.msg === 'charge attempts (batch)')).toMatchObject({ level: 30, records: 2, chargesSucceeded: 1, retriesScheduled: 1 });
  });
});
