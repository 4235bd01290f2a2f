/**
 * Ingestion stores a file in chunks (each its own short transaction) so that
 * other writes never wait for a whole file, and bills it all at once when it
 * seals the run. These tests keep a stream of AddFunds calls going during the
 * run: on SQLite each waiting write makes the run commit its chunk, so the
 * file is really stored over many transactions.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as jobPb from '../../generated/billing/v1/job_service';
import { checkInvariants } from '../../src/ops/invariants';
import { onPostgres } from '../helpers/database';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { entry, writeNdjson, type Entry } from '../helpers/usage';

type Row = Record<string, unknown>;
const LONG = { deadlineMs: 120_000 };

describe('ingestion in chunks', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  const q = (sql: string, params: unknown[] = []) => t.app.db.fork().execute<Row[]>(sql, params);

  async function users(n: number): Promise<bigint[]> {
    const ids: bigint[] = [];
    for (let i = 0; i < n; i++) {
      const { user } = await call(t.users, 'createUser', { email: `k${i}@example.com`, name: `K${i}`, requestId: '' });
      await call(t.wallets, 'addFunds', { userId: user!.id, amount: money('100000'), requestId: '' });
      ids.push(user!.id);
    }
    return ids;
  }

  /** A new app (no retry scheduler unless `app` says) with `n` funded users and its usage file: `count` NDJSON entries, the k-th made by `make`. */
  async function appWithFile(
    n: number,
    count: number,
    make: (ids: bigint[], k: number) => Entry,
    app: Parameters<typeof startTestApp>[1] = { scheduler: false },
  ): Promise<bigint[]> {
    t = await startTestApp({}, app);
    const ids = await users(n);
    writeNdjson(
      path.join(t.dir, 'usage-logs.json'),
      Array.from({ length: count }, (_, k) => make(ids, k)),
    );
    return ids;
  }

  /** AddFunds one after another until `done` resolves; returns how many were answered before it did. */
  async function creditsDuring(done: Promise<unknown>, userId: bigint): Promise<number> {
    let finished = false;
    void done.finally(() => (finished = true));
    let during = 0;
    for (let i = 0; !finished; i++) {
      await call(t.wallets, 'addFunds', { userId, amount: money('0.01'), requestId: `during-${i}` }, LONG);
      if (!finished) during++;
    }
    return during;
  }

  async function waitRunning(): Promise<void> {
    for (let i = 0; i < 2000; i++) {
      const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 0, pageToken: '' });
      if (jobRuns.some((r) => r.status === jobPb.JobRunStatus.JOB_RUN_STATUS_RUNNING)) return;
      await new Promise((r) => setTimeout(r, 5));
    }
    throw new Error('the run never started');
  }

  it('a long ingestion does not hold other writes: credits are answered while it runs, and it bills every entry once', async () => {
    const N = 60_000;
    const ids = await appWithFile(20, N, (u, k) => entry(Number(u[k % 20]), 'api-calls', 1 + (k % 7), { id: `c-${k}` }));
    const run = call(t.jobs, 'processLogs', {}, LONG).then((r) => r.jobRun!);
    await waitRunning();
    const during = await creditsDuring(run, ids[0]);
    const done = await run;
    expect(done.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    // With the run as one transaction the first credit waited for its end.
    expect(during).toBeGreaterThanOrEqual(10);
    const [{ n }] = await q(`select count(*) as n from usage_logs where status = 'BILLED'`);
    expect(Number(n)).toBe(N);
    const perUser = await q(`select user_id, count(*) as n from billing_records where kind = 'USAGE' group by user_id`);
    expect(perUser.map((r) => Number(r.n))).toEqual(ids.map(() => 1)); // one record per user per run
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('a JSON array that turns out truncated after chunks were stored bills nothing, and rolls them back', async () => {
    t = await startTestApp({}, { scheduler: false });
    const ids = await users(10);
    const file = path.join(t.dir, 'usage-logs.json');
    const valid = Array.from({ length: 30_000 }, (_, k) => entry(Number(ids[k % 10]), 'storage', 1, { id: `a-${k}` }));
    fs.writeFileSync(file, '[\n' + valid.map((e) => JSON.stringify(e)).join(',\n') + ',\n{"userId": 1, "serv');
    // A reader beside the service watches rows appear as chunks commit.
    let most = 0;
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        const [{ n }] = await q(`select count(*) as n from usage_logs`);
        most = Math.max(most, Number(n));
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    const run = call(t.jobs, 'processLogs', {}, LONG).then((r) => r.jobRun!);
    await waitRunning();
    await creditsDuring(run, ids[0]);
    const failed = await run;
    watching = false;
    await watcher;
    expect(failed.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
    expect(failed.errorMessage).toMatch(/unusable, nothing was billed/);
    expect(most).toBeGreaterThan(0); // chunks were committed before the end of the file was reached
    // Nothing billed, nothing listed, nothing left behind.
    const [{ n }] = await q(`select count(*) as n from usage_logs`);
    expect(Number(n)).toBe(0);
    expect((await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 0, pageToken: '' })).billingRecords).toEqual([]);
    const [{ n: records }] = await q(`select count(*) as n from billing_records`);
    expect(Number(records)).toBe(0); // the staging records went with their rows
    expect((await q(`select state from usage_runs`)).map((r) => r.state)).toEqual(['ROLLED_BACK']);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);

    // The file, completed, is billed once.
    fs.writeFileSync(file, '[\n' + valid.map((e) => JSON.stringify(e)).join(',\n') + '\n]\n');
    const ok = (await call(t.jobs, 'processLogs', {}, LONG)).jobRun!;
    expect([ok.status, ok.entriesAccepted, ok.billingRecordsCreated]).toEqual([jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED, 30_000n, 10n]);
    const [{ n: billed }] = await q(`select count(*) as n from usage_logs where status = 'BILLED'`);
    expect(Number(billed)).toBe(30_000);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  // SQLite only: on PostgreSQL a crashed replica's run stays RUNNING until its lease ends, so the scheduler there
  // does not wait for RUNNING runs (billing/records.repository.ts, NOT_A_RUNNING_RUNS_OWN).
  (onPostgres ? it.skip : it)('the run charges every record it sealed itself while the retry scheduler looks every millisecond', async () => {
    // Sealed records are due at once (the scheduler's, should the run die first). A look of the scheduler between
    // the run's charge transactions took the rest 5,000 to a transaction, and the run counted only its own.
    const N = 1_200;
    await appWithFile(N, N, (u, k) => entry(Number(u[k]), 'api-calls', 1, { id: `s-${k}` }), { schedulerPollMs: 1 });
    const run = (await call(t.jobs, 'processLogs', {}, LONG)).jobRun!;
    expect([run.status, run.billingRecordsCreated, run.chargesSucceeded]).toEqual([jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED, BigInt(N), BigInt(N)]);
    const [{ n }] = await q(`select count(*) as n from billing_records where kind = 'USAGE' and status = 'PAID'`);
    expect(Number(n)).toBe(N);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('the rows of a run are listed only once it sealed them', async () => {
    const ids = await appWithFile(5, 30_000, (u, k) => entry(Number(u[k % 5]), 'compute', 1, { id: `l-${k}` }));
    const seen = new Set<number>();
    const run = call(t.jobs, 'processLogs', {}, LONG).then((r) => r.jobRun!);
    await waitRunning();
    let finished = false;
    void run.finally(() => (finished = true));
    for (let i = 0; !finished; i++) {
      await call(t.wallets, 'addFunds', { userId: ids[0], amount: money('0.01'), requestId: `x-${i}` }, LONG);
      const { usageLogs } = await call(t.billing, 'listUsageLogs', { source: 0, userId: 0n, status: 0, pageSize: 500, pageToken: '' });
      seen.add(usageLogs.length);
    }
    await run;
    // While storing: none listed; once sealed: all (a page of 500).
    for (const n of seen) expect([0, 500]).toContain(n);
    const { usageLogs } = await call(t.billing, 'listUsageLogs', { source: 0, userId: 0n, status: 0, pageSize: 500, pageToken: '' });
    expect(usageLogs).toHaveLength(500);
  });

  it('a run that died while preparing its records (line items written, not sealed) is rolled back with them, and the file is billed once', async () => {
    const N = 30;
    const ids = await appWithFile(3, N, (u, k) => entry(Number(u[k % 3]), 'api-calls', 1, { id: `p-${k}` }));
    // What a run killed between preparing and sealing leaves: every row stored BILLED, its staging records with
    // their descriptions and line items (amount 0), the run STAGING.
    await t.app.db.transaction(async (tx) => {
      await tx.run(`insert into job_runs (id, kind, status, trigger, started_at) values (900, 'PROCESS_LOGS', 'RUNNING', 'rpc', 0)`, []);
      await tx.run(`insert into usage_runs (job_run_id, first_usage_id, state) values (900, 1, 'STAGING')`, []);
      for (const [u, userId] of ids.entries()) {
        const [{ id: recordId }] = await tx.all<Row>(
          `insert into billing_records (user_id, kind, amount, status, description, attempt_count, job_run_id, created_at, updated_at, staging)
           values (?, 'USAGE', 0, 'PENDING', 'Usage: 10 api-calls (job run 900)', 0, 900, 0, 0, ?) returning id`,
          [userId, true],
        );
        await tx.run(`insert into line_items (billing_record_id, service, quantity, unit_price, amount) values (?, 'api-calls', 10000000, 10000, 100000)`, [
          recordId,
        ]);
        for (let k = u; k < N; k += 3) {
          await tx.run(
            `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, billing_record_id, job_run_id, ingested_at, source)
             values (?, ?, 'api-calls', 1000000, 0, 'BILLED', '', ?, 900, 0, 'FILE')`,
            [`e:p-${k}`, userId, recordId],
          );
        }
      }
    });
    expect((await checkInvariants(t.app.db)).violations).toEqual([]); // a run caught preparing is not a violation

    const run = (await call(t.jobs, 'processLogs', {}, LONG)).jobRun!;
    expect([run.status, run.entriesAccepted, run.entriesDuplicate, run.billingRecordsCreated]).toEqual([jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED, 30n, 0n, 3n]);
    expect((await q(`select state from usage_runs order by state`)).map((r) => r.state)).toEqual(['ROLLED_BACK', 'SEALED']);
    // The dead run's records went with their line items; each entry is billed once, by the new run.
    const [{ n: staging }] = await q(`select count(*) as n from billing_records where staging = ? or job_run_id = 900`, [true]);
    expect(Number(staging)).toBe(0);
    const lines = await q(`select cast(li.amount as text) as amount, r.status from line_items li join billing_records r on r.id = li.billing_record_id`);
    expect(lines).toEqual(ids.map(() => ({ amount: '100000', status: 'PAID' })));
    const [{ n: billed }] = await q(`select count(*) as n from usage_logs where status = 'BILLED' and job_run_id <> 900`);
    expect(Number(billed)).toBe(N);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });
});
