/**
 * The built service as a real process: start-up, configuration errors and
 * graceful shutdown on SIGTERM, also when started with `npm start`. `npm test`
 * builds dist/ before jest runs.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { call, money } from '../helpers/harness';
import {
  descendantsOf,
  isRunning,
  killServiceProcesses,
  MAIN,
  startServiceProcess,
  type ServiceProcess,
} from '../helpers/service-process';

describe('the service process', () => {
  let dir: string;
  let db: TestDatabase;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-proc-'));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    await killServiceProcesses();
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('exits 0 on SIGTERM after letting in-flight calls finish', async () => {
    const svc = await startServiceProcess({ GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off' });
    const { users, wallets } = svc;
    const { user } = await call(users, 'createUser', { email: 'p@example.com', name: 'P', requestId: '' });
    const inFlight = Array.from({ length: 50 }, () =>
      call(wallets, 'addFunds', { userId: user!.id, amount: money('1'), requestId: '' }).then(
        () => 'ok' as const,
        (err: grpc.ServiceError) => err.code,
      ),
    );
    await new Promise((r) => setTimeout(r, 5));
    svc.child.kill('SIGTERM');
    const outcomes = await Promise.all(inFlight);
    const { code, signal } = await svc.exit;
    svc.close();
    expect({ code, signal }).toEqual({ code: 0, signal: null });
    // Every call either completed or failed cleanly (refused as the server closed); none hung or was cut mid-write.
    for (const o of outcomes) expect(['ok', grpc.status.UNAVAILABLE, grpc.status.CANCELLED]).toContain(o);
    expect(svc.output()).toContain('billing-service stopped');

    // Whatever completed is in the ledger, exactly: restart and compare.
    const again = await startServiceProcess({ GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off' });
    const w2 = again.wallets;
    const { balance } = await call(w2, 'getBalance', { userId: user!.id });
    const { transactions } = await call(w2, 'listWalletTransactions', { userId: user!.id, pageSize: 500, pageToken: '' });
    expect(balance!.units).toBe(BigInt(transactions.length));
    expect(transactions.length).toBeGreaterThanOrEqual(outcomes.filter((o) => o === 'ok').length);
    again.close();
    again.child.kill('SIGTERM');
    expect((await again.exit).code).toBe(0);
  });

  it.each([
    ['an invalid value', { PRICING: '{"api-calls": 0.01}' }, 'PRICING'],
    ['a tokens file that does not exist', { AUTH_TOKENS_FILE: '/nonexistent/tokens.json' }, 'AUTH_TOKENS_FILE'],
    ['a public address without authentication', { GRPC_HOST: '0.0.0.0' }, 'ALLOW_INSECURE'],
  ])('refuses to start (exit 2) with %s and names the setting', async (_what, env, name) => {
    const child = spawn(process.execPath, [MAIN], {
      env: { PATH: process.env.PATH, GRPC_PORT: '0', DB_PATH: path.join(dir, 'b.db'), ...env },
    });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const code = await new Promise((resolve) => child.on('exit', resolve));
    expect({ code, err }).toEqual({ code: 2, err: expect.stringContaining(name) });
    expect(fs.existsSync(path.join(dir, 'b.db'))).toBe(false); // nothing opened
  });
});

describe('npm start', () => {
  let dir: string;
  let db: TestDatabase;
  let env: Record<string, string>;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-npm-'));
    db = await createTestDatabase(dir);
    env = { GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off', LOG_FILE_PATH: path.join(dir, 'none.json') };
  });
  afterEach(async () => {
    await killServiceProcesses();
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // The real npm, in the repository root. A build (`rm -rf dist && tsc`) would take 10-35 s here; the timeout
  // is generous so that a start that builds fails on the assertions below, which say why, not on the timeout.
  const npmStart = () => startServiceProcess(env, { command: ['npm', 'start'], timeoutMs: 120_000 });

  /** dist/src/main.js as the last build left it: a rebuild makes a new file (new inode and mtime). */
  const build = () => {
    const stat = fs.statSync(MAIN);
    return { ino: stat.ino, mtimeMs: stat.mtimeMs };
  };

  /** The service processes (node dist/src/main.js) anywhere below a process. */
  const servicesBelow = (pid: number) =>
    descendantsOf(pid)
      .filter((p) => /^\S*node \S*dist\/src\/main\.js/.test(p.args))
      .map((p) => p.pid);

  /**
   * The output once it holds one of `texts` (or after 10 s): npm's exit can be seen before the last lines the
   * service wrote have come through the pipe.
   */
  const outputWith = async (svc: ServiceProcess, ...texts: string[]) => {
    const deadline = Date.now() + 10_000;
    while (!texts.some((t) => svc.output().includes(t)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return svc.output();
  };

  const portOpen = (port: number) =>
    new Promise<boolean>((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port });
      socket.once('connect', () => (socket.destroy(), resolve(true)));
      socket.once('error', () => resolve(false));
    });

  it('serves without building, and SIGTERM to npm stops the service (no orphan, port closed) and npm exits 0', async () => {
    const before = build();
    const started = Date.now();
    const svc = await npmStart();
    const readyMs = Date.now() - started;
    svc.close();
    const services = servicesBelow(svc.child.pid!);
    expect(services).toHaveLength(1);

    // What a container runtime or systemd does: SIGTERM to the process it started, npm, and to nothing else.
    svc.child.kill('SIGTERM');
    const npm = await svc.exit;
    expect({
      rebuilt: JSON.stringify(build()) !== JSON.stringify(before),
      // Without a build the start takes about a second; 20 s leaves room for a loaded machine.
      readyWithin20s: readyMs < 20_000,
      npm,
      stillRunning: services.filter(isRunning),
      portOpen: await portOpen(svc.port),
    }).toEqual({ rebuilt: false, readyWithin20s: true, npm: { code: 0, signal: null }, stillRunning: [], portOpen: false });
    expect(await outputWith(svc, '"billing-service stopped"')).toContain('"billing-service stopped"');
  });

  it('Ctrl-C (SIGINT to the whole foreground process group) shuts the service down gracefully once and npm exits 0', async () => {
    const svc = await npmStart();
    svc.close();
    const services = servicesBelow(svc.child.pid!);
    expect(services).toHaveLength(1);

    // A terminal sends SIGINT to every process of the foreground job: npm, and the service, which npm also
    // forwards it to. The service sees it twice and must treat that as one request to stop.
    process.kill(-svc.child.pid!, 'SIGINT');
    const npm = await svc.exit;
    const out = await outputWith(svc, '"billing-service stopped"', 'second signal');
    expect({
      npm,
      stopped: out.includes('"billing-service stopped"'),
      secondSignal: out.includes('second signal'),
      stillRunning: services.filter(isRunning),
    }).toEqual({ npm: { code: 0, signal: null }, stopped: true, secondSignal: false, stillRunning: [] });
  });
});
