import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import { checkInvariants } from '../../src/ops/invariants';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { appendNdjson, entry, writeJsonArray, writeNdjson } from '../helpers/usage';

const S = billingPb.UsageLogStatus;

async function createUsers(t: TestApp, n: number, funds = '1000'): Promise<void> {
  for (let i = 1; i <= n; i++) {
    const { user } = await call(t.users, 'createUser', { email: `user${i}@example.com`, name: `User ${i}`, requestId: '' });
    if (funds !== '0') await call(t.wallets, 'addFunds', { userId: user!.id, amount: money(funds), requestId: '' });
  }
}

// A run of a large file is long work: the test's own timeout bounds it, not the 10 s default deadline (a 100k-entry
// run on PostgreSQL passed that deadline on a machine running 3x slower than usual).
const processLogs = async (t: TestApp) => (await call(t.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;

async function records(t: TestApp, userId = 0n) {
  return (await call(t.billing, 'listBillingRecords', { userId, status: 0, pageSize: 500, pageToken: '' })).billingRecords;
}

async function usageLogs(t: TestApp, status = S.USAGE_LOG_STATUS_UNSPECIFIED) {
  return (await call(t.billing, 'listUsageLogs', { source: 0, userId: 0n, status, pageSize: 500, pageToken: '' })).usageLogs;
}

const amountOf = (m?: { units: bigint; nanos: number }) => `${m!.units}.${String(m!.nanos / 1000).padStart(6, '0')}`;

describe('usage ingestion', () => {
  let t: TestApp;
  let file: string;
  afterEach(async () => t?.stop());

  async function start(env: Record<string, string> = {}) {
    t = await startTestApp(env);
    file = path.join(t.dir, 'usage-logs.json');
  }

  it('bills the shipped sample file at the default prices with exact totals', async () => {
    await start({ LOG_FILE_PATH: path.resolve(__dirname, '../../data/usage-logs.json') });
    await createUsers(t, 3);
    const run = await processLogs(t);
    expect(run.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    expect(run.entriesRead).toBe(6n);
    expect(run.entriesAccepted).toBe(6n);
    expect(run.billingRecordsCreated).toBe(3n);
    expect(run.chargesSucceeded).toBe(3n);
    const byUser = Object.fromEntries((await records(t)).map((r) => [String(r.userId), r]));
    expect(amountOf(byUser['1'].amount)).toBe('12.500000'); // 1000 x 0.01 + 50 x 0.05
    expect(amountOf(byUser['2'].amount)).toBe('54.000000'); // 5000 x 0.01 + 200 x 0.02
    expect(amountOf(byUser['3'].amount)).toBe('12.500000'); // 100 x 0.10 + 250 x 0.01
    expect(byUser['1'].lineItems.map((l) => [l.service, l.quantity, amountOf(l.unitPrice), amountOf(l.amount)])).toEqual([
      ['api-calls', '1000', '0.010000', '10.000000'],
      ['storage', '50', '0.050000', '2.500000'],
    ]);
    for (const r of Object.values(byUser)) expect(r.status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
    const { balance } = await call(t.wallets, 'getBalance', { userId: 2n });
    expect(amountOf(balance)).toBe('946.000000');
    const logs = await usageLogs(t);
    expect(logs.every((l) => l.status === S.USAGE_LOG_STATUS_BILLED && l.billingRecordId > 0n)).toBe(true);
  });

  it("a run whose total for one user and service would pass int64 bills what fits exactly, keeps the rest PENDING with a reason, and bills everyone else", async () => {
    await start();
    await createUsers(t, 2, '0');
    // Bandwidth in bytes: ten valid entries of 999,999,999,999 units add up to more than 2^63 - 1 micro-units.
    const big = '999999999999';
    write10();
    function write10() {
      writeNdjson(file, [
        ...Array.from({ length: 10 }, (_, i) => entry(1, 'bandwidth', big, { id: `big-${i}` })),
        entry(2, 'api-calls', 100, { id: 'small-1' }),
      ]);
    }
    const first = await processLogs(t);
    expect(first.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    expect({ accepted: first.entriesAccepted, pending: first.entriesPending, records: first.billingRecordsCreated }).toEqual({
      accepted: 11n,
      pending: 1n,
      records: 2n,
    });
    const [r1] = await records(t, 1n);
    // Nine entries fit: the quantity and amount are exact (x 0.02), not saturated.
    expect(r1.lineItems.map((l) => [l.service, l.quantity, amountOf(l.amount)])).toEqual([
      ['bandwidth', '8999999999991', '179999999999.820000'],
    ]);
    expect(amountOf(r1.amount)).toBe('179999999999.820000');
    const [r2] = await records(t, 2n);
    expect(amountOf(r2.amount)).toBe('1.000000');
    const waiting = await usageLogs(t, S.USAGE_LOG_STATUS_PENDING);
    expect(waiting.map((l) => [l.userId, l.quantity, l.reason])).toEqual([[1n, big, 'OVER_RECORD_LIMIT']]);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);

    // The next run bills the entry that waited, in a record of its own; nothing is billed twice.
    const second = await processLogs(t);
    expect(second.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    expect({ duplicate: second.entriesDuplicate, pending: second.entriesPending, records: second.billingRecordsCreated }).toEqual({
      duplicate: 11n,
      pending: 0n,
      records: 1n,
    });
    const user1 = await records(t, 1n);
    expect(user1.map((r) => r.lineItems.map((l) => l.quantity))).toEqual([['8999999999991'], [big]]);
    expect((await usageLogs(t, S.USAGE_LOG_STATUS_BILLED)).length).toBe(11);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it.each([
    ['a JSON array', writeJsonArray],
    ['NDJSON', writeNdjson],
  ])('reading %s twice bills nothing new the second time', async (_name, write) => {
    await start();
    await createUsers(t, 2);
    write(file, [entry(1, 'api-calls', 100), entry(2, 'storage', '2.5'), entry(1, 'compute', 1)]);
    const first = await processLogs(t);
    expect([first.entriesRead, first.entriesAccepted, first.entriesDuplicate, first.billingRecordsCreated]).toEqual([3n, 3n, 0n, 2n]);
    const second = await processLogs(t);
    expect([second.entriesRead, second.entriesAccepted, second.entriesDuplicate, second.billingRecordsCreated]).toEqual([3n, 0n, 3n, 0n]);
    expect(await records(t)).toHaveLength(2);
    expect(await usageLogs(t)).toHaveLength(3);
  });

  it('an appended file bills only the new entries', async () => {
    await start();
    await createUsers(t, 1);
    writeNdjson(file, [entry(1, 'api-calls', 100)]);
    await processLogs(t);
    appendNdjson(file, [entry(1, 'api-calls', 100), entry(1, 'storage', 10)]);
    const run = await processLogs(t);
    expect([run.entriesRead, run.entriesAccepted, run.entriesDuplicate]).toEqual([3n, 2n, 1n]);
    const recs = await records(t);
    expect(recs.map((r) => amountOf(r.amount))).toEqual(['1.000000', '1.500000']);
  });

  it('two identical entries in one file are two usages, each billed once', async () => {
    await start();
    await createUsers(t, 1);
    writeJsonArray(file, [entry(1, 'api-calls', 100), entry(1, 'api-calls', 100)]);
    const run = await processLogs(t);
    expect(run.entriesAccepted).toBe(2n);
    const [record] = await records(t);
    expect(amountOf(record.amount)).toBe('2.000000');
    expect((await processLogs(t)).entriesDuplicate).toBe(2n);
  });

  it('an entry id is its identity: the same id later in the file or in another run is a duplicate, or a conflict when its content differs', async () => {
    await start();
    await createUsers(t, 1);
    writeNdjson(file, [
      entry(1, 'api-calls', 100, { id: 'evt-1' }),
      entry(1, 'api-calls', 100, { id: 'evt-1' }), // the same usage again
      entry(1, 'api-calls', 999, { id: 'evt-1' }), // another quantity: a conflict, the first stands
      entry(2, 'api-calls', 100, { id: 'evt-1' }), // another user: a conflict
      entry(1, 'api-calls', -1, { id: 'evt-1' }), // invalid: rejected (by its content), never a conflict
    ]);
    const run = await processLogs(t);
    expect([run.entriesRead, run.entriesAccepted, run.entriesRejected, run.entriesDuplicate, run.entriesConflict]).toEqual([5n, 1n, 1n, 1n, 2n]);
    expect(amountOf((await records(t))[0].amount)).toBe('1.000000');
    // Read again: the stored usage decides, entry by entry (the rejected entry is stored, so a duplicate now).
    const again = await processLogs(t);
    expect([again.entriesRead, again.entriesAccepted, again.entriesRejected, again.entriesDuplicate, again.entriesConflict]).toEqual([5n, 0n, 0n, 3n, 2n]);
    expect(await records(t)).toHaveLength(1);
  });

  it('accepts a string userId and resource as a synonym of service', async () => {
    await start();
    await createUsers(t, 1);
    writeNdjson(file, [{ userId: '1', resource: 'storage', quantity: 2, timestamp: '2024-01-15T10:00:00+02:00' }]);
    const run = await processLogs(t);
    expect(run.entriesAccepted).toBe(1n);
    const [log] = await usageLogs(t);
    expect([log.userId, log.service, log.quantity, log.timestamp?.toISOString()]).toEqual([1n, 'storage', '2', '2024-01-15T08:00:00.000Z']);
  });

  it('rejects each invalid entry with its reason, counts it, and bills the rest', async () => {
    await start();
    await createUsers(t, 1);
    const future = new Date(Date.now() + 3600_000).toISOString();
    writeNdjson(file, [
      'this is not json',
      '[1, 2]',
      { userId: 0, service: 'api-calls', quantity: 1, timestamp: '2024-01-15T10:00:00Z' },
      { userId: 1, quantity: 1, timestamp: '2024-01-15T10:00:00Z' },
      { userId: 1, service: 'api-calls', quantity: -1, timestamp: '2024-01-15T10:00:00Z' },
      { userId: 1, service: 'api-calls', quantity: '0.0000001', timestamp: '2024-01-15T10:00:00Z' },
      { userId: 1, service: 'api-calls', quantity: 'ten', timestamp: '2024-01-15T10:00:00Z' },
      { userId: 1, service: 'api-calls', quantity: 1, timestamp: 'yesterday' },
      { userId: 1, service: 'api-calls', quantity: 1, timestamp: future },
      entry(1, 'api-calls', 100),
    ]);
    const run = await processLogs(t);
    expect([run.entriesRead, run.entriesRejected, run.entriesAccepted, run.chargesSucceeded]).toEqual([10n, 9n, 1n, 1n]);
    const rejected = await usageLogs(t, S.USAGE_LOG_STATUS_REJECTED);
    expect(rejected.map((l) => l.reason)).toEqual([
      'INVALID_JSON',
      'NOT_AN_OBJECT',
      'INVALID_USER_ID',
      'MISSING_SERVICE',
      'NEGATIVE_QUANTITY',
      'QUANTITY_TOO_PRECISE',
      'INVALID_QUANTITY',
      'INVALID_TIMESTAMP',
      'FUTURE_TIMESTAMP',
    ]);
    // A rejection is recorded once, however often the file is read.
    const again = await processLogs(t);
    expect([again.entriesRejected, again.entriesDuplicate]).toEqual([0n, 10n]);
  });

  it('keeps usage of an unknown user PENDING and bills it once the user exists', async () => {
    await start();
    writeNdjson(file, [entry(1, 'api-calls', 100)]);
    const first = await processLogs(t);
    expect([first.entriesAccepted, first.entriesPending, first.billingRecordsCreated]).toEqual([1n, 1n, 0n]);
    const [pending] = await usageLogs(t, S.USAGE_LOG_STATUS_PENDING);
    expect(pending.reason).toBe('UNKNOWN_USER');
    await createUsers(t, 1);
    const second = await processLogs(t);
    expect([second.entriesDuplicate, second.entriesPending, second.billingRecordsCreated, second.chargesSucceeded]).toEqual([1n, 0n, 1n, 1n]);
    const [billed] = await usageLogs(t, S.USAGE_LOG_STATUS_BILLED);
    expect(billed.reason).toBe('');
  });

  it('keeps usage of a service with no price PENDING and bills it after a restart with a price', async () => {
    await start();
    const dir = t.dir;
    const env = { DB_PATH: path.join(dir, 'keep.db'), LOG_FILE_PATH: path.join(dir, 'keep.ndjson') };
    await t.stop();
    fs.mkdirSync(dir, { recursive: true });
    t = await startTestApp(env);
    await createUsers(t, 1);
    writeNdjson(env.LOG_FILE_PATH, [entry(1, 'gpu-hours', 3), entry(1, 'api-calls', 100)]);
    const first = await processLogs(t);
    expect([first.entriesPending, first.billingRecordsCreated]).toEqual([1n, 1n]);
    expect((await usageLogs(t, S.USAGE_LOG_STATUS_PENDING))[0].reason).toBe('NO_PRICE');
    await t.app.stop();
    t = await startTestApp({ ...env, PRICING: JSON.stringify({ 'api-calls': '0.01', 'gpu-hours': '2.5' }) });
    const second = await processLogs(t);
    expect([second.entriesPending, second.billingRecordsCreated]).toEqual([0n, 1n]);
    const recs = await records(t);
    expect(amountOf(recs[1].amount)).toBe('7.500000');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it.each([
    ['cut inside an element', '[\n{"userId": 1, "service": "api-calls", "quantity": 1, "timestamp": "2024-01-15T10:00:00Z"},\n{"userId": 1, "serv'],
    ['missing the closing bracket', '[\n{"userId": 1, "service": "api-calls", "quantity": 1, "timestamp": "2024-01-15T10:00:00Z"}\n'],
    ['with a syntax error', '[\n{"userId": 1, "service": "api-calls", "quantity": 1, "timestamp": "2024-01-15T10:00:00Z"}\n{"userId": 2}]'],
  ])('a JSON array file %s bills nothing and the run reports the error and its position', async (_name, text) => {
    await start();
    await createUsers(t, 1);
    fs.writeFileSync(file, text);
    const run = await processLogs(t);
    expect(run.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
    expect(run.errorMessage).toMatch(/line \d+/);
    expect(await usageLogs(t)).toHaveLength(0);
    expect(await records(t)).toHaveLength(0);
  });

  it('a missing file is a reported, non-fatal outcome', async () => {
    await start();
    const run = await processLogs(t);
    expect(run.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    expect(run.entriesRead).toBe(0n);
    expect(run.errorMessage).toMatch(/not found/);
  });

  it('a usage path that is a FIFO fails the run at once with a clear reason, and writes keep flowing', async () => {
    await start();
    await createUsers(t, 1);
    execFileSync('mkfifo', [file]); // nobody ever writes to it: reading it would block forever
    const run = await call(t.jobs, 'processLogs', {}, { deadlineMs: 15_000 }).then((r) => r.jobRun!);
    expect(run.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
    expect(run.errorMessage).toContain('it is a FIFO, not a regular file');
    // The writer was never held: a credit goes through, and no run is left RUNNING.
    await call(t.wallets, 'addFunds', { userId: 1n, amount: money('1'), requestId: '' }, { deadlineMs: 5_000 });
    const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 10, pageToken: '' });
    expect(jobRuns.map((r) => jobPb.JobRunStatus[r.status])).toEqual(['JOB_RUN_STATUS_FAILED']);
  });

  it('bills a suspended user like any other', async () => {
    await start();
    await createUsers(t, 1);
    await call(t.users, 'suspendUser', { id: 1n, reason: 'manual review' });
    writeNdjson(file, [entry(1, 'api-calls', 100)]);
    const run = await processLogs(t);
    expect(run.chargesSucceeded).toBe(1n);
  });

  it('concurrent ProcessLogs triggers share one run', async () => {
    await start();
    await createUsers(t, 1);
    writeNdjson(file, Array.from({ length: 2000 }, (_, i) => entry(1, 'api-calls', i)));
    const runs = await Promise.all([processLogs(t), processLogs(t), processLogs(t)]);
    expect(new Set(runs.map((r) => r.id)).size).toBe(1);
    expect(await records(t)).toHaveLength(1);
    const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 0, pageToken: '' });
    expect(jobRuns).toHaveLength(1);
  });

  it('ingests a 100k-entry file with bounded memory', async () => {
    await start();
    await createUsers(t, 100);
    const out = fs.createWriteStream(file);
    for (let i = 0; i < 100_000; i++) {
      out.write(JSON.stringify(entry((i % 100) + 1, i % 2 ? 'api-calls' : 'storage', (i % 50) + 1, { timestamp: new Date(1705312800000 + i * 1000).toISOString() })) + '\n');
    }
    await new Promise((resolve) => out.end(resolve));
    global.gc?.();
    const before = process.memoryUsage().rss;
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
    const run = await processLogs(t);
    clearInterval(sampler);
    expect([run.entriesAccepted, run.billingRecordsCreated]).toEqual([100_000n, 100n]);
    // The file is ~10 MB of text; holding it (or its entries) would add far more than this.
    expect(peak - before).toBeLessThan(150 * 1024 * 1024);
  });
});
