/**
 * The built service as a real process: start-up, configuration errors and
 * graceful shutdown on SIGTERM. `npm test` builds dist/ before jest runs.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { call, money } from '../helpers/harness';
import { killServiceProcesses, MAIN, startServiceProcess } from '../helpers/service-process';

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
