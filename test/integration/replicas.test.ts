/**
 * Several replicas on one database: start-up migrations, scheduled ticks,
 * manual triggers, charges and top-ups from every replica at once, with
 * retries running, and money still exact afterwards.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { migrationsList } from '../../src/db/migrations';
import { tickKey } from '../../src/jobs/cron';
import { createTestDatabase, onPostgres, type TestDatabase } from '../helpers/database';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { killServiceProcesses, startServiceProcess, type ServiceProcess } from '../helpers/service-process';
import { entry, writeNdjson } from '../helpers/usage';

// Replicas are a PostgreSQL deployment: SQLite is the embedded default for one process (README, Deployment).
(onPostgres ? describe : describe.skip)('replicas sharing one database (in process)', () => {
  let dir: string;
  let db: TestDatabase;
  let apps: TestApp[] = [];
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-replicas-'));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    for (const a of apps) await a.app.stop();
    apps = [];
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const start = (n: number) =>
    Promise.all(Array.from({ length: n }, () => startTestApp({ ...db.env, LOG_FILE_PATH: path.join(dir, 'usage.ndjson') }, { scheduler: false })));

  it('start at the same moment on a fresh database: one migrates, all come up', async () => {
    apps = await start(3);
    const rows = await apps[0].app.db.fork().execute<{ n: number }[]>('select count(*) as n from mikro_orm_migrations');
    expect(Number(rows[0].n)).toBe(migrationsList.length); // each applied once
  });

  it('a cron tick claimed by one replica is skipped by the others, and the tick runs once', async () => {
    apps = await start(3);
    const [a] = apps;
    const { user } = await call(a.users, 'createUser', { email: 'tick@example.com', name: 'T', requestId: '' });
    await call(a.wallets, 'addFunds', { userId: user!.id, amount: money('100'), requestId: '' });
    writeNdjson(path.join(dir, 'usage.ndjson'), Array.from({ length: 500 }, (_, i) => entry(Number(user!.id), 'api-calls', i + 1)));
    const key = tickKey(new Date('2026-01-01T10:00:00.004Z'));
    const runs = await Promise.all(apps.map((x) => x.app.services.jobs.runForPeriod('PROCESS_ALL', key)));
    expect(runs.filter((r) => r !== null)).toHaveLength(1);
    const { billingRecords } = await call(a.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 0, pageToken: '' });
    expect(billingRecords).toHaveLength(1);
    // The next tick is a new period.
    const next = await Promise.all(apps.map((x) => x.app.services.jobs.runForPeriod('PROCESS_ALL', tickKey(new Date('2026-01-01T11:00:00Z')))));
    expect(next.filter((r) => r !== null)).toHaveLength(1);
  });

  it('a manual trigger on one replica and cron ticks on the others bill each entry once', async () => {
    apps = await start(3);
    const [a, b, c] = apps;
    const { user } = await call(a.users, 'createUser', { email: 'mix@example.com', name: 'M', requestId: '' });
    await call(a.wallets, 'addFunds', { userId: user!.id, amount: money('1000'), requestId: '' });
    writeNdjson(path.join(dir, 'usage.ndjson'), Array.from({ length: 3000 }, (_, i) => entry(Number(user!.id), 'storage', 1, { id: `e${i}` })));
    const key = tickKey(new Date());
    await Promise.all([
      call(a.jobs, 'processLogs', {}),
      b.app.services.jobs.runForPeriod('PROCESS_ALL', key),
      c.app.services.jobs.runForPeriod('PROCESS_ALL', key),
      call(c.jobs, 'processAll', {}),
    ]);
    const logs = await a.app.db.fork().execute<{ status: string; n: number }[]>(
      'select status, count(*) as n from usage_logs group by status',
    );
    expect(logs.map((r) => [r.status, Number(r.n)])).toEqual([['BILLED', 3000]]);
    const { balance } = await call(b.wallets, 'getBalance', { userId: user!.id });
    expect([balance!.units, balance!.nanos]).toEqual([850n, 0]); // 1000 - 3000 x 0.05
  });
});

// Several processes on one database is what PostgreSQL is for; SQLite is one process by design.
(onPostgres ? describe : describe.skip)('3 replica processes on one PostgreSQL database', () => {
  let dir: string;
  let db: TestDatabase;
  let replicas: ServiceProcess[] = [];
  afterEach(async () => {
    for (const r of replicas) r.close();
    await killServiceProcesses();
    replicas = [];
    await db?.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('concurrent triggers, charges and top-ups while retries run: nothing charged or billed twice, balances equal ledgers', async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-3rep-'));
    db = await createTestDatabase(dir);
    const usage = path.join(dir, 'usage.ndjson');
    const USERS = 30;
    const env = {
      ...db.env,
      GRPC_PORT: '0',
      LOG_LEVEL: 'info',
      LOG_FILE_PATH: usage,
      RETRY_BASE_DELAY_MS: '50',
      MAX_RETRIES: '4',
      INGEST_CRON: '* * * * * *', // every second, on every replica
    };
    replicas = await Promise.all([startServiceProcess(env), startServiceProcess(env), startServiceProcess(env)]);
    const clients = replicas;
    const pick = (i: number) => clients[i % clients.length];

    const userIds: bigint[] = [];
    for (let i = 0; i < USERS; i++) {
      const { user } = await call(pick(i).users, 'createUser', { email: `r${i}@example.com`, name: `R${i}`, requestId: `cu-${i}` });
      userIds.push(user!.id);
    }
    // Half the users start short, so charges fail and retries run on every replica.
    await Promise.all(userIds.map((id, i) => (i % 2 ? Promise.resolve() : call(pick(i).wallets, 'addFunds', { userId: id, amount: money('20'), requestId: `seed-${i}` }))));
    const entries = Array.from({ length: 6000 }, (_, i) => entry(Number(userIds[i % USERS]), i % 3 ? 'api-calls' : 'storage', (i % 7) + 1, { timestamp: new Date(1705312800000 + i * 1000).toISOString() }));
    writeNdjson(usage, entries);

    const manualRecords = await Promise.all(
      userIds.map((id, i) => call(pick(i).billing, 'createBillingRecord', { userId: id, amount: money('1.5'), description: 'setup', requestId: `mr-${i}` })),
    );
    // Everything at once, spread over the replicas: triggers, charges of the same records from every replica,
    // top-ups (each sent twice with one request_id, to two replicas).
    const work: Promise<unknown>[] = [];
    for (let round = 0; round < 3; round++) {
      for (const [i, c] of clients.entries()) {
        work.push(call(c.jobs, 'processLogs', {}, { deadlineMs: 60_000 }));
        work.push(call(c.jobs, 'processRetries', {}, { deadlineMs: 60_000 }));
        for (const r of manualRecords) work.push(call(c.billing, 'processBillingRecord', { id: r.billingRecord!.id }));
        for (const [u, id] of userIds.entries()) {
          if ((u + round + i) % 4 === 0) {
            const req = { userId: id, amount: money('3'), requestId: `top-${round}-${u}` };
            work.push(call(c.wallets, 'addFunds', req), call(pick(i + 1).wallets, 'addFunds', req));
          }
        }
      }
    }
    const results = await Promise.allSettled(work);
    const unexpected = results.filter(
      (r) => r.status === 'rejected' && ![grpc.status.ALREADY_EXISTS, grpc.status.FAILED_PRECONDITION].includes((r.reason as grpc.ServiceError).code),
    );
    expect({ unexpected: unexpected.map((r) => String((r as PromiseRejectedResult).reason)), logged: replicas.flatMap((r) => r.errors()) }).toEqual({
      unexpected: [],
      logged: [],
    });
    // Let the last cron ticks and retries settle.
    await new Promise((r) => setTimeout(r, 2500));
    for (const c of clients) await call(c.jobs, 'processAll', {}, { deadlineMs: 60_000 });

    const em = (await startTestApp({ ...db.env }, { scheduler: false })).app;
    try {
      const q = <T>(sql: string) => em.db.fork().execute<T[]>(sql);
      // Every usage entry stored once and billed once.
      const usageRows = await q<{ status: string; n: number }>(`select status, count(*) as n from usage_logs group by status order by status`);
      expect(usageRows.map((r) => [r.status, Number(r.n)])).toEqual([['BILLED', entries.length]]);
      // No record debited twice; every PAID record with an amount has exactly one debit of that amount.
      expect(await q(`select billing_record_id from wallet_transactions where type = 'DEBIT' group by billing_record_id having count(*) > 1`)).toEqual([]);
      expect(
        await q(`select r.id from billing_records r where r.status = 'PAID' and r.amount > 0 and
                 (select count(*) from wallet_transactions t where t.billing_record_id = r.id and t.type = 'DEBIT' and t.amount = r.amount) <> 1`),
      ).toEqual([]);
      // Balances equal their ledgers, never below zero.
      expect(
        await q(`select w.user_id from wallets w where w.balance < 0 or w.balance <>
                 coalesce((select sum(case when t.type = 'CREDIT' then t.amount else -t.amount end) from wallet_transactions t where t.user_id = w.user_id), 0)`),
      ).toEqual([]);
      // Each top-up request_id credited once although it was sent to two replicas.
      expect(await q(`select request_id from wallet_transactions where request_id is not null group by request_id having count(*) > 1`)).toEqual([]);
      // Each usage record's amount is the sum of its lines.
      expect(
        await q(`select r.id from billing_records r where r.kind = 'USAGE' and r.amount <> (select sum(l.amount) from line_items l where l.billing_record_id = r.id)`),
      ).toEqual([]);
      // The cron ticks of the three replicas ran each tick once.
      expect(await q(`select period_key from job_runs where period_key is not null group by period_key having count(*) > 1`)).toEqual([]);
    } finally {
      await em.stop();
    }
  });
});
