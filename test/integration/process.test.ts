/**
 * The built service as a real process: start-up, configuration errors and
 * graceful shutdown on SIGTERM. `npm test` builds dist/ before jest runs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { call, money } from '../helpers/harness';

const MAIN = path.resolve(__dirname, '../../dist/src/main.js');

interface Started {
  child: ChildProcess;
  port: number;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  output: () => string;
}

function startService(env: Record<string, string>): Promise<Started> {
  const child = spawn(process.execPath, [MAIN], { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`service did not start:\n${out}`)), 20_000);
    const onData = () => {
      for (const line of out.split('\n')) {
        if (!line.includes('billing-service ready')) continue;
        clearTimeout(timer);
        child.stdout!.off('data', onData);
        resolve({ child, port: JSON.parse(line).port, exit, output: () => out });
        return;
      }
    };
    child.stdout!.on('data', onData);
    void exit.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`service exited with ${code} before it was ready:\n${out}`));
    });
  });
}

describe('the service process', () => {
  let dir: string;
  let db: TestDatabase;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-proc-'));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('exits 0 on SIGTERM after letting in-flight calls finish', async () => {
    const svc = await startService({ GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off' });
    const address = `127.0.0.1:${svc.port}`;
    const users = new userPb.UserServiceClient(address, grpc.credentials.createInsecure());
    const wallets = new walletPb.WalletServiceClient(address, grpc.credentials.createInsecure());
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
    users.close();
    wallets.close();
    expect({ code, signal }).toEqual({ code: 0, signal: null });
    // Every call either completed or failed cleanly (refused as the server closed); none hung or was cut mid-write.
    for (const o of outcomes) expect(['ok', grpc.status.UNAVAILABLE, grpc.status.CANCELLED]).toContain(o);
    expect(svc.output()).toContain('billing-service stopped');

    // Whatever completed is in the ledger, exactly: restart and compare.
    const again = await startService({ GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off' });
    const w2 = new walletPb.WalletServiceClient(`127.0.0.1:${again.port}`, grpc.credentials.createInsecure());
    const { balance } = await call(w2, 'getBalance', { userId: user!.id });
    const { transactions } = await call(w2, 'listWalletTransactions', { userId: user!.id, pageSize: 500, pageToken: '' });
    expect(balance!.units).toBe(BigInt(transactions.length));
    expect(transactions.length).toBeGreaterThanOrEqual(outcomes.filter((o) => o === 'ok').length);
    w2.close();
    again.child.kill('SIGTERM');
    expect((await again.exit).code).toBe(0);
  });

  it('refuses to start with an invalid setting and names it', async () => {
    const child = spawn(process.execPath, [MAIN], {
      env: { PATH: process.env.PATH, GRPC_PORT: '0', DB_PATH: path.join(dir, 'b.db'), PRICING: '{"api-calls": 0.01}' },
    });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const code = await new Promise((resolve) => child.on('exit', resolve));
    expect(code).toBe(2);
    expect(err).toContain('PRICING');
  });
});
