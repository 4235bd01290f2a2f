/**
 * Usage over gRPC meeting other writers half-way: an ingestion run that has
 * stored an event's id but not sealed its run yet, and a user created while
 * usage for that id is being recorded.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Client } from 'pg';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import { checkInvariants } from '../../src/ops/invariants';
import { createUsageLogsRepository } from '../../src/usage/usage-logs.repository';
import { onPostgres } from '../helpers/database';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { brief, event, micros, recordUsage, T0 } from '../helpers/usage-api';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The first page of usage entries (500), of one source or all. */
async function usageLogs(t: TestApp, source = billingPb.UsageSource.USAGE_SOURCE_UNSPECIFIED) {
  return (await call(t.billing, 'listUsageLogs', { userId: 0n, status: 0, source, pageSize: 500, pageToken: '' })).usageLogs;
}

describe('usage over gRPC and an ingestion run that has not sealed yet', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  /** Writes a big usage file whose first entry is `overlap`, starts ProcessLogs, and waits until that entry is stored, unsealed. */
  async function runHolding(overlap: Record<string, unknown>, truncate: boolean) {
    const { user } = await call(t.users, 'createUser', { email: 'o@example.com', name: 'O', requestId: '' });
    await call(t.wallets, 'addFunds', { userId: user!.id, amount: money('100000'), requestId: '' });
    const u = Number(user!.id);
    const file = path.join(t.dir, 'usage-logs.json');
    const rest = Array.from({ length: 150_000 }, (_, i) => JSON.stringify({ id: `f-${i}`, userId: u, service: 'storage', quantity: 1, timestamp: T0.toISOString() }));
    // A JSON array: cut at the end, the whole run fails once it reaches the cut and is rolled back.
    fs.writeFileSync(file, `[\n${[JSON.stringify({ userId: u, ...overlap }), ...rest].join(',\n')}${truncate ? ',\n{"userId": 1, "serv' : '\n]\n'}`);
    const run = call(t.jobs, 'processLogs', {}, { deadlineMs: 120_000 }).then((r) => r.jobRun!);
    const repo = createUsageLogsRepository(t.app.db);
    for (let i = 0; i < 2000; i++) {
      const stored = await t.app.db.transaction((tx) => repo.storedEvents(tx, [String(overlap.id)]));
      if (stored.has(String(overlap.id))) break;
      await sleep(5);
    }
    return { u, run };
  }

  it('an event whose id a running file run stored is answered once that run has sealed: DUPLICATE of the billed entry', async () => {
    t = await startTestApp({}, { scheduler: false });
    const { u, run } = await runHolding({ id: 'overlap', service: 'api-calls', quantity: 10, timestamp: T0.toISOString() }, false);
    const results = await recordUsage(t.usage, [event('overlap', u, 'api-calls', '10'), event('solo', u, 'api-calls', '1')], { deadlineMs: 120_000 });
    const finished = await run;
    expect(finished.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    const logs = await usageLogs(t);
    const overlap = logs.find((l) => l.eventId === 'overlap')!;
    expect(overlap.status).toBe(billingPb.UsageLogStatus.USAGE_LOG_STATUS_BILLED);
    expect(brief(results)).toEqual([
      ['DUPLICATE', overlap.id, ''],
      ['ACCEPTED', (await usageLogs(t, billingPb.UsageSource.USAGE_SOURCE_API)).find((l) => l.eventId === 'solo')!.id, ''],
    ]);
  });

  it('an event whose id a run stored is DUPLICATE at once when that run has read its file and is sealing its records (decided)', async () => {
    t = await startTestApp({}, { scheduler: false });
    const { user } = await call(t.users, 'createUser', { email: 's@example.com', name: 'S', requestId: '' });
    const u = Number(user!.id);
    // What a run killed while sealing leaves (or one still sealing): its rows stored, its record staging, the run SEALING.
    const held = await t.app.db.transaction(async (tx) => {
      await tx.run(`insert into job_runs (id, kind, status, trigger, started_at) values (900, 'PROCESS_LOGS', 'RUNNING', 'rpc', 0)`, []);
      await tx.run(`insert into usage_runs (job_run_id, first_usage_id, state) values (900, 1, 'SEALING')`, []);
      const [{ id: recordId }] = await tx.all<{ id: number }>(
        `insert into billing_records (user_id, kind, amount, status, description, attempt_count, job_run_id, created_at, updated_at, staging)
         values (?, 'USAGE', 0, 'PENDING', 'Usage: 10 api-calls (job run 900)', 0, 900, 0, 0, ?) returning id`,
        [u, true],
      );
      await tx.run(`insert into line_items (billing_record_id, service, quantity, unit_price, amount) values (?, 'api-calls', 10000000, 10000, 100000)`, [recordId]);
      const [{ id }] = await tx.all<{ id: number }>(
        `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, billing_record_id, job_run_id, ingested_at, source)
         values ('e:held', ?, 'api-calls', 10000000, ?, 'BILLED', '', ?, 900, 0, 'FILE') returning id`,
        [u, T0.getTime(), recordId],
      );
      return Number(id);
    });
    // A run still reading its file would make this wait (up to 120 s, past the deadline); a decided one answers now.
    const results = await recordUsage(t.usage, [event('held', u, 'api-calls', '10')], { deadlineMs: 10_000 });
    expect(brief(results)).toEqual([['DUPLICATE', BigInt(held), '']]);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('an event whose id a run stored and then rolled back (its file was cut) is recorded from gRPC, once', async () => {
    t = await startTestApp({}, { scheduler: false });
    const { u, run } = await runHolding({ id: 'overlap', service: 'api-calls', quantity: 10, timestamp: T0.toISOString() }, true);
    const results = await recordUsage(t.usage, [event('overlap', u, 'api-calls', '10')], { deadlineMs: 120_000 });
    const finished = await run;
    expect(finished.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
    const logs = await usageLogs(t);
    // The file's rows are gone; the event stands, recorded by RecordUsage, and is billable.
    expect(logs.map((l) => [l.eventId, l.source, l.status])).toEqual([
      ['overlap', billingPb.UsageSource.USAGE_SOURCE_API, billingPb.UsageLogStatus.USAGE_LOG_STATUS_PENDING],
    ]);
    expect(brief(results)).toEqual([['ACCEPTED', logs[0].id, '']]);
    const b = await call(t.wallets, 'getBalance', { userId: BigInt(u) });
    expect(micros(b.balance) - micros(b.availableBalance)).toBe(100_000n); // 10 x 0.01
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });
});

(onPostgres ? describe : describe.skip)('PostgreSQL: usage for a user id that is being created', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('usage recorded while the user is created counts in their available balance, whichever commits first', async () => {
    t = await startTestApp({}, { scheduler: false });
    const url = t.app.config.database.kind === 'postgresql' ? t.app.config.database.url : '';
    const side = new Client({ connectionString: url });
    await side.connect();
    try {
      // Hold the event's key with an uncommitted row: RecordUsage, having found user 1 unknown, waits at its insert.
      await side.query('begin');
      await side.query(
        `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, billing_record_id, job_run_id, ingested_at, source)
         values ('e:early', 1, 'api-calls', 0, 0, 'REJECTED', 'HOLD', null, null, 0, 'API')`,
      );
      const recorded = recordUsage(t.usage, [event('early', 1, 'api-calls', '300')], { deadlineMs: 30_000 });
      await sleep(300);
      // Meanwhile user 1 is created (without the fix it commits now, before the usage, and never counts it).
      const created = call(t.users, 'createUser', { email: 'late@example.com', name: 'L', requestId: '' }, { deadlineMs: 30_000 });
      await sleep(300);
      await side.query('rollback');
      const [results, { user }] = await Promise.all([recorded, created]);
      expect(user!.id).toBe(1n);
      expect(brief(results)).toEqual([['PENDING', results[0].usageId, 'UNKNOWN_USER']]);
    } finally {
      await side.end();
    }
    const b = await call(t.wallets, 'getBalance', { userId: 1n });
    expect(micros(b.balance) - micros(b.availableBalance)).toBe(3_000_000n); // 300 x 0.01, counted once
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });
});
