/**
 * Faults that must lose nothing: client deadlines shorter than the work, a
 * database that is locked or drops its connections, and SIGTERM under load.
 * Each change is committed entirely or not at all, a retry with the same
 * request_id returns the committed result, and the invariant checker passes.
 */
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { Client } from 'pg';
import pino from 'pino';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import type { DatabaseConfig } from '../../src/config';
import { openDatabase, type Database } from '../../src/db/database';
import { checkInvariants } from '../../src/ops/invariants';
import { onPostgres } from '../helpers/database';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { startServiceProcess, useProcessWorkspace, type ServiceProcess } from '../helpers/service-process';
import { writeNdjson } from '../helpers/usage';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const micros = (m?: { units: bigint; nanos: number }) => m!.units * 1_000_000n + BigInt(m!.nanos / 1000);
const codeOf = (err: unknown) => grpc.status[(err as grpc.ServiceError).code];

type Row = Record<string, unknown>;

/** The database config of a running test app, for a second connection of the test's own. */
const dbConfigOf = (t: TestApp): DatabaseConfig => t.app.config.database;

const openSide = (config: DatabaseConfig): Promise<Database> => openDatabase(config, pino({ level: 'silent' }), { migrate: false });

/** Calls `send` until it succeeds (a bounded number of times), returning the result. */
async function untilOk<T>(send: () => Promise<T>, what: string): Promise<T> {
  let last: unknown;
  for (let i = 0; i < 40; i++) {
    try {
      return await send();
    } catch (err) {
      last = err;
      expect({ what, code: codeOf(err) }).toEqual({ what, code: 'UNAVAILABLE' });
      await sleep(50);
    }
  }
  throw new Error(`${what} never succeeded: ${String(last)}`);
}

describe('client deadlines and cancellation', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('ProcessLogs cut off by a 5 ms deadline bills the whole file or nothing, never part of it', async () => {
    t = await startTestApp({}, { scheduler: false });
    const users: number[] = [];
    for (let u = 0; u < 20; u++) {
      const { user } = await call(t.users, 'createUser', { email: `d${u}@example.com`, name: 'D', requestId: '' });
      await call(t.wallets, 'addFunds', { userId: user!.id, amount: money('100000'), requestId: '' });
      users.push(Number(user!.id));
    }
    const N = 20_000;
    writeNdjson(
      path.join(t.dir, 'usage-logs.json'),
      Array.from({ length: N }, (_, k) => ({ id: `big-${k}`, userId: users[k % 20], service: 'api-calls', quantity: 1 + (k % 9), timestamp: '2025-02-01T00:00:00Z' })),
    );
    // A connection of the test's own watches what other readers can see while the run goes on.
    const side = await openSide(dbConfigOf(t));
    const seen = new Set<number>();
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        // Billed: linked to a record its run sealed (a run stores its rows in chunks, and bills them all at once).
        const [{ n }] = await side.fork().execute<Row[]>(
          `select count(*) as n from usage_logs l join billing_records r on r.id = l.billing_record_id where r.staging = ?`,
          [false],
        );
        seen.add(Number(n));
        await sleep(2);
      }
    })();
    try {
      const code = await call(t.jobs, 'processLogs', {}, { deadlineMs: 5 }).then(
        () => 'OK',
        (err) => codeOf(err),
      );
      expect(['DEADLINE_EXCEEDED', 'OK']).toContain(code);
      // The server finishes the run it started; wait until no run is RUNNING.
      for (let i = 0; i < 600; i++) {
        const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 0, pageToken: '' }, { deadlineMs: 60_000 });
        if (jobRuns.length > 0 && jobRuns.every((r) => r.status !== jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING)) break;
        await sleep(20);
      }
    } finally {
      watching = false;
      await watcher;
    }
    try {
      // Every look from outside saw no entry billed, or all of them.
      for (const n of seen) expect([0, N]).toContain(n);
      // A second trigger completes what might be missing and bills nothing twice.
      const again = (await call(t.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;
      expect(again.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
      const [{ n }] = await side.fork().execute<Row[]>(`select count(*) as n from usage_logs where status = 'BILLED'`);
      expect(Number(n)).toBe(N);
      expect((await checkInvariants(t.app.db)).violations).toEqual([]);
    } finally {
      await side.close();
    }
  });

  it('AddFunds cut off by a 1 ms deadline credits once: the retry with the same request_id returns the committed result', async () => {
    t = await startTestApp({}, { scheduler: false });
    const { user } = await call(t.users, 'createUser', { email: 'late@example.com', name: 'Late', requestId: '' });
    const userId = user!.id;
    const ids = Array.from({ length: 30 }, (_, i) => `late-${i}`);
    const first = await Promise.all(
      ids.map((requestId, i) =>
        call(t.wallets, 'addFunds', { userId, amount: money(`${i + 1}`), requestId }, { deadlineMs: 1 }).then(
          (res) => ({ requestId, code: 'OK', txId: res.transaction!.id }),
          (err) => ({ requestId, code: codeOf(err), txId: 0n }),
        ),
      ),
    );
    for (const f of first) expect(['OK', 'DEADLINE_EXCEEDED', 'CANCELLED']).toContain(f.code);
    const retried = [];
    for (const [i, requestId] of ids.entries()) {
      const res = await call(t.wallets, 'addFunds', { userId, amount: money(`${i + 1}`), requestId });
      retried.push({ requestId, amount: micros(res.transaction!.amount), txId: res.transaction!.id });
    }
    // An answered first call and its retry name the same ledger row.
    for (const f of first.filter((x) => x.code === 'OK')) {
      expect(retried.find((r) => r.requestId === f.requestId)!.txId).toBe(f.txId);
    }
    const rows = await t.app.db.fork().execute<Row[]>(
      `select request_id, cast(amount as text) as amount from wallet_transactions where type = 'CREDIT' order by request_id`,
    );
    expect(rows.map((r) => `${r.request_id}=${r.amount}`).sort()).toEqual(ids.map((id, i) => `${id}=${(i + 1) * 1_000_000}`).sort());
    expect(micros((await call(t.wallets, 'getBalance', { userId })).balance)).toBe(465_000_000n); // 1 + 2 + ... + 30
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });
});

describe('when the database is locked or drops its connections', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  async function state() {
    const em = t.app.db.fork();
    const [credits] = await em.execute<Row[]>(`select count(*) as n from wallet_transactions where type = 'CREDIT'`);
    const [records] = await em.execute<Row[]>(`select count(*) as n from billing_records`);
    const [keys] = await em.execute<Row[]>(`select count(*) as n from idempotency_keys`);
    const [balance] = await em.execute<Row[]>(`select cast(coalesce(sum(balance), 0) as text) as b from wallets`);
    return { credits: Number(credits.n), records: Number(records.n), keys: Number(keys.n), balance: balance.b };
  }

  // SQLite has one writer: another process holding the write lock past the busy timeout (5 s) is the failure.
  (onPostgres ? it.skip : it)(
    'SQLite: a held write lock gives UNAVAILABLE DATABASE_UNAVAILABLE with nothing half-applied, and the retry goes through once',
    async () => {
      t = await startTestApp({}, { scheduler: false });
      const { user } = await call(t.users, 'createUser', { email: 'locked@example.com', name: 'L', requestId: '' });
      const userId = user!.id;
      await call(t.wallets, 'addFunds', { userId, amount: money('10'), requestId: 'before' });
      const before = await state();

      const other = await openSide(dbConfigOf(t));
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      let locked!: () => void;
      const isLocked = new Promise<void>((resolve) => (locked = resolve));
      const holder = other.fork().transactional(async (tx) => {
        await tx.execute('update users set name = name', [], 'run');
        locked();
        await held;
      });
      try {
        await isLocked;
        const addFunds = call(t.wallets, 'addFunds', { userId, amount: money('5'), requestId: 'during' }, { deadlineMs: 30_000 });
        const create = call(
          t.billing,
          'createBillingRecord',
          { userId, amount: money('3'), description: 'during', requestId: 'rec-during' },
          { deadlineMs: 30_000 },
        );
        await expectGrpcError(addFunds, grpc.status.UNAVAILABLE, 'DATABASE_UNAVAILABLE');
        await expectGrpcError(create, grpc.status.UNAVAILABLE, 'DATABASE_UNAVAILABLE');
      } finally {
        release();
        await holder;
        await other.close();
      }
      expect(await state()).toEqual(before);

      // The lock is gone: the same requests go through, once.
      await call(t.wallets, 'addFunds', { userId, amount: money('5'), requestId: 'during' });
      await call(t.wallets, 'addFunds', { userId, amount: money('5'), requestId: 'during' });
      const rec = await call(t.billing, 'createBillingRecord', { userId, amount: money('3'), description: 'during', requestId: 'rec-during' });
      expect(rec.outcome).toBe(billingPb.ChargeOutcome.CHARGE_OUTCOME_CHARGED);
      expect(micros((await call(t.wallets, 'getBalance', { userId })).balance)).toBe(12_000_000n);
      expect(await state()).toEqual({ credits: before.credits + 1, records: 1, keys: before.keys + 2, balance: '12000000' });
      expect((await checkInvariants(t.app.db)).violations).toEqual([]);
    },
  );

  (onPostgres ? it.skip : it)(
    'SQLite: a write whose caller gave up (deadline) while it waited for the writer is never applied',
    async () => {
      t = await startTestApp({}, { scheduler: false });
      const { user } = await call(t.users, 'createUser', { email: 'gone@example.com', name: 'G', requestId: '' });
      const userId = user!.id;
      const other = await openSide(dbConfigOf(t));
      let release!: () => void;
      const held = new Promise<void>((resolve) => (release = resolve));
      let locked!: () => void;
      const isLocked = new Promise<void>((resolve) => (locked = resolve));
      const holder = other.fork().transactional(async (tx) => {
        await tx.execute('update users set name = name', [], 'run');
        locked();
        await held;
      });
      try {
        await isLocked;
        // The first credit waits for the lock (SQLite's busy timeout); the second queues behind it.
        const first = call(t.wallets, 'addFunds', { userId, amount: money('1'), requestId: 'first' }, { deadlineMs: 30_000 });
        await sleep(100);
        const gaveUp = await call(t.wallets, 'addFunds', { userId, amount: money('2'), requestId: 'gave-up' }, { deadlineMs: 300 }).then(
          () => 'OK',
          codeOf,
        );
        expect(gaveUp).toBe('DEADLINE_EXCEEDED');
        await sleep(700);
        release(); // the first credit gets the lock and commits; the second's turn comes after its caller left
        await first;
      } finally {
        release();
        await holder;
        await other.close();
      }
      await sleep(200);
      const rows = await t.app.db.fork().execute<Row[]>(`select request_id from wallet_transactions where type = 'CREDIT' order by id`);
      expect(rows.map((r) => r.request_id)).toEqual(['first']);
      expect(micros((await call(t.wallets, 'getBalance', { userId })).balance)).toBe(1_000_000n);
      // Its retry with the same request_id is a first credit, applied once.
      await call(t.wallets, 'addFunds', { userId, amount: money('2'), requestId: 'gave-up' });
      await call(t.wallets, 'addFunds', { userId, amount: money('2'), requestId: 'gave-up' });
      expect(micros((await call(t.wallets, 'getBalance', { userId })).balance)).toBe(3_000_000n);
    },
  );

  (onPostgres ? it : it.skip)(
    'PostgreSQL: with its connections terminated, calls succeed or return UNAVAILABLE, never half-applied, and the service recovers',
    async () => {
      // knex reports each lost pool connection with console.log ("Connection Error: ..."); keep the output readable.
      const quiet = jest.spyOn(console, 'log').mockImplementation(() => undefined);
      t = await startTestApp({}, { scheduler: false });
      const userIds: bigint[] = [];
      for (let u = 0; u < 5; u++) {
        const { user } = await call(t.users, 'createUser', { email: `pg${u}@example.com`, name: 'P', requestId: '' });
        userIds.push(user!.id);
      }
      const url = (dbConfigOf(t) as { url: string }).url;
      const admin = new Client({ connectionString: url });
      await admin.connect();
      let terminated = 0;
      const terminate = async () => {
        const res = await admin.query(
          `select pg_terminate_backend(pid) as gone from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid()`,
        );
        terminated += res.rows.filter((r: { gone: boolean }) => r.gone).length;
      };

      const plan: { requestId: string; send: () => Promise<unknown> }[] = [];
      const codes = new Map<string, string>();
      try {
        for (let round = 0; round < 4; round++) {
          // Warm the pool, so that there are idle connections to lose as well as busy ones.
          await Promise.all(userIds.map((userId) => call(t.wallets, 'getBalance', { userId }).catch(() => undefined)));
          const batch = Array.from({ length: 30 }, (_, i) => {
            const userId = userIds[i % userIds.length];
            const requestId = `r${round}-${i}`;
            const send =
              i % 3 === 2
                ? () => call(t.billing, 'createBillingRecord', { userId, amount: money('0.5'), description: requestId, requestId })
                : () => call(t.wallets, 'addFunds', { userId, amount: money(`${i + 1}`), requestId });
            return { requestId, send };
          });
          plan.push(...batch);
          if (round % 2 === 0) await terminate(); // idle connections lost between calls
          const inFlight = batch.map((b) =>
            b.send().then(
              () => codes.set(b.requestId, 'OK'),
              (err) => codes.set(b.requestId, codeOf(err)),
            ),
          );
          if (round % 2 === 1) await terminate(); // busy connections lost mid-transaction
          await Promise.all(inFlight);
        }
      } finally {
        await admin.end();
      }
      try {
        expect(terminated).toBeGreaterThan(0);

        // Recovery: every request goes through, once; a replay changes nothing.
        for (const p of plan) await untilOk(p.send, p.requestId);
        for (const p of plan) await p.send();
        const em = t.app.db.fork();
        const credits = await em.execute<Row[]>(`select request_id, count(*) as n from wallet_transactions where type = 'CREDIT' group by request_id`);
        const records = await em.execute<Row[]>(`select description, count(*) as n from billing_records group by description`);
        const once = [...credits.map((r) => `${r.request_id}:${Number(r.n)}`), ...records.map((r) => `${r.description}:${Number(r.n)}`)];
        expect(once.sort()).toEqual(plan.map((p) => `${p.requestId}:1`).sort());
        expect((await checkInvariants(t.app.db)).violations).toEqual([]);

        // While the connections went away, a call either succeeded or said UNAVAILABLE (retry): never INTERNAL.
        const unexpected = [...codes].filter(([, code]) => code !== 'OK' && code !== 'UNAVAILABLE');
        expect(unexpected).toEqual([]);
      } finally {
        quiet.mockRestore();
      }
    },
  );
});

describe('SIGTERM under load', () => {
  const ws = useProcessWorkspace('billing-term-');

  it('with ~200 calls in flight every call completes or fails cleanly, the process exits 0, and retries credit once', async () => {
    const { dir, db, running: started } = ws;
    const env = { GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off', LOG_LEVEL: 'info', LOG_FILE_PATH: path.join(dir, 'none.json') };
    let svc = await startServiceProcess(env);
    started.push(svc);
    const userIds: bigint[] = [];
    for (let u = 0; u < 20; u++) {
      const { user } = await call(svc.users, 'createUser', { email: `t${u}@example.com`, name: 'T', requestId: `u${u}` });
      userIds.push(user!.id);
    }
    type Planned = { requestId: string; send: (s: ServiceProcess) => Promise<string> };
    const plan: Planned[] = Array.from({ length: 200 }, (_, i) => {
      const userId = userIds[i % userIds.length];
      const requestId = `load-${i}`;
      return i % 5 < 3
        ? {
            requestId,
            send: (s: ServiceProcess) =>
              call(s.wallets, 'addFunds', { userId, amount: money(`${(i % 7) + 1}`), requestId }, { deadlineMs: 60_000 }).then((r) =>
                String(r.transaction!.id),
              ),
          }
        : {
            requestId,
            send: (s: ServiceProcess) =>
              call(
                s.billing,
                'createBillingRecord',
                { userId, amount: money(`${(i % 4) + 1}`), description: requestId, requestId },
                { deadlineMs: 60_000 },
              ).then((r) => String(r.billingRecord!.id)),
          };
    });
    let answered!: () => void;
    const firstAnswer = new Promise<void>((resolve) => (answered = resolve));
    const outcomes = plan.map((p) =>
      p.send(svc).then(
        (value) => {
          answered();
          return { requestId: p.requestId, code: 'OK', value };
        },
        (err) => ({ requestId: p.requestId, code: codeOf(err), value: '' }),
      ),
    );
    await firstAnswer; // the service is busy with the batch now
    svc.child.kill('SIGTERM');
    const results = await Promise.all(outcomes);
    const exit = await svc.exit;
    svc.close();
    expect(exit).toEqual({ code: 0, signal: null });
    // Nothing hung (no deadline hit) and nothing failed any other way.
    expect(results.filter((r) => !['OK', 'UNAVAILABLE', 'CANCELLED'].includes(r.code))).toEqual([]);
    expect(results.some((r) => r.code === 'OK')).toBe(true);

    // Restart and retry what failed; replay what succeeded: one credit or record per request_id, same answer.
    svc = await startServiceProcess(env);
    started.push(svc);
    for (const [i, p] of plan.entries()) {
      const again = await p.send(svc);
      if (results[i].code === 'OK') expect({ requestId: p.requestId, value: again }).toEqual({ requestId: p.requestId, value: results[i].value });
    }
    svc.close();
    svc.child.kill('SIGTERM');
    expect(await svc.exit).toEqual({ code: 0, signal: null });

    const config: DatabaseConfig = db.env.DATABASE_URL ? { kind: 'postgresql', url: db.env.DATABASE_URL } : { kind: 'sqlite', path: db.env.DB_PATH };
    const side = await openSide(config);
    try {
      const em = side.fork();
      expect((await checkInvariants(side)).violations).toEqual([]);
      const credits = await em.execute<Row[]>(`select request_id, count(*) as n from wallet_transactions where type = 'CREDIT' group by request_id`);
      const records = await em.execute<Row[]>(`select description, count(*) as n from billing_records group by description`);
      const once = [...credits.map((r) => `${r.request_id}:${Number(r.n)}`), ...records.map((r) => `${r.description}:${Number(r.n)}`)];
      expect(once.sort()).toEqual(plan.map((p) => `${p.requestId}:1`).sort());
    } finally {
      await side.close();
    }
  });
});
