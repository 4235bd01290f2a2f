/**
 * UsageService.RecordUsage and GetUsageSummary against the running server:
 * one result per event for every status, retries, the usage file sharing the
 * identity space, the available balance, and summaries checked against
 * reference sums computed here.
 */
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { Client } from 'pg';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as usagePb from '../../generated/billing/v1/usage_service';
import { checkInvariants } from '../../src/ops/invariants';
import { onPostgres } from '../helpers/database';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { mulberry32 } from '../helpers/prng';
import { writeNdjson } from '../helpers/usage';
import { brief, DEFAULT_PRICES, event, micros, priced, R, recordUsage, scaled, T0 } from '../helpers/usage-api';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const codeOf = (err: unknown) => grpc.status[(err as grpc.ServiceError).code];

async function createUser(t: TestApp, n: number, funds = '0'): Promise<bigint> {
  const { user } = await call(t.users, 'createUser', { email: `u${n}@example.com`, name: `U${n}`, requestId: '' });
  if (funds !== '0') await call(t.wallets, 'addFunds', { userId: user!.id, amount: money(funds), requestId: '' });
  return user!.id;
}

async function usageLogs(t: TestApp, filter: Partial<billingPb.ListUsageLogsRequest> = {}) {
  const all: billingPb.UsageLog[] = [];
  for (let pageToken = ''; ; ) {
    const res = await call(t.billing, 'listUsageLogs', { userId: 0n, status: 0, source: 0, pageSize: 500, pageToken, ...filter });
    all.push(...res.usageLogs);
    if (res.nextPageToken === '') return all;
    pageToken = res.nextPageToken;
  }
}

const balances = async (t: TestApp, userId: bigint) => {
  const b = await call(t.wallets, 'getBalance', { userId });
  const w = (await call(t.wallets, 'getWallet', { userId })).wallet!;
  // GetWallet and GetBalance tell the same.
  expect({ balance: micros(w.balance), available: micros(w.availableBalance) }).toEqual({ balance: micros(b.balance), available: micros(b.availableBalance) });
  return { balance: micros(b.balance), available: micros(b.availableBalance) };
};

const processLogs = async (t: TestApp) => (await call(t.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;

describe('RecordUsage', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('answers ACCEPTED with the new usage id; the entry is listed PENDING with source API and its event id', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    const results = await recordUsage(t.usage, [event('ev-1', u, 'api-calls', '12.5')]);
    expect(results).toHaveLength(1);
    expect(results[0].status).toBe(R.USAGE_EVENT_STATUS_ACCEPTED);
    expect(results[0].usageId).toBeGreaterThan(0n);
    const [log] = await usageLogs(t);
    expect(log).toMatchObject({
      id: results[0].usageId,
      userId: u,
      service: 'api-calls',
      quantity: '12.5',
      timestamp: T0,
      status: billingPb.UsageLogStatus.USAGE_LOG_STATUS_PENDING,
      source: billingPb.UsageSource.USAGE_SOURCE_API,
      eventId: 'ev-1',
      billingRecordId: 0n,
    });
  });

  it('answers every status in one batch, one result per event in order, and a bad event never stops the rest', async () => {
    t = await startTestApp({}, { scheduler: false });
    const live = await createUser(t, 1);
    const gone = await createUser(t, 2);
    await call(t.users, 'deleteUser', { id: gone });
    const [before] = await recordUsage(t.usage, [event('old', live, 'storage', '1')]);
    const results = await recordUsage(t.usage, [
      event('a', live, 'api-calls', '3'), // ACCEPTED
      event('', live, 'api-calls', '3'), // REJECTED: no id
      event('old', live, 'storage', '1'), // DUPLICATE of an earlier call
      event('old', live, 'storage', '2'), // CONFLICT with it
      event('u', 999, 'api-calls', '1'), // PENDING: unknown user
      event('d', gone, 'api-calls', '1'), // PENDING: deleted user
      event('p', live, 'gpu-hours', '1'), // PENDING: no price
      event('q', live, 'api-calls', '0.0000001'), // REJECTED: too precise
      event('a', live, 'api-calls', '3'), // DUPLICATE of this batch's first event
      event('a', live, 'api-calls', '4'), // CONFLICT with it
      event('b', live, 'compute', '2'), // ACCEPTED, after all of the above
    ]);
    const a = results[0].usageId;
    expect(brief(results)).toEqual([
      ['ACCEPTED', a, ''],
      ['REJECTED', 0n, 'MISSING_ID'],
      ['DUPLICATE', before.usageId, ''],
      ['CONFLICT', before.usageId, 'EVENT_ID_REUSED'],
      ['PENDING', results[4].usageId, 'UNKNOWN_USER'],
      ['PENDING', results[5].usageId, 'USER_DELETED'],
      ['PENDING', results[6].usageId, 'NO_PRICE'],
      ['REJECTED', 0n, 'QUANTITY_TOO_PRECISE'],
      ['DUPLICATE', a, ''],
      ['CONFLICT', a, 'EVENT_ID_REUSED'],
      ['ACCEPTED', results[10].usageId, ''],
    ]);
    const stored = [a, results[4].usageId, results[5].usageId, results[6].usageId, results[10].usageId];
    expect(new Set(stored).size).toBe(5);
    for (const id of stored) expect(id).toBeGreaterThan(0n);
    for (const i of [1, 7]) expect(results[i].message).not.toBe('');
    // Stored: the earlier event plus the five new ones; nothing of the rejected, duplicate or conflicting ones.
    const logs = await usageLogs(t);
    expect(logs.map((l) => [l.eventId, l.quantity]).sort()).toEqual(
      [['a', '3'], ['b', '2'], ['d', '1'], ['old', '1'], ['p', '1'], ['u', '1']].sort(),
    );
  });

  it('REJECTED events carry the reasons the usage file gives the same entries', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = Number(await createUser(t, 1));
    const future = new Date(Date.now() + 3_600_000);
    const bad: [string, usagePb.UsageEvent, Record<string, unknown>][] = [
      ['INVALID_ID', event('x'.repeat(201), u, 'api-calls', '1'), { id: 'x'.repeat(201) }],
      ['INVALID_ID', event('tab\there', u, 'api-calls', '1'), { id: 'tab\there' }],
      ['INVALID_USER_ID', event('r1', 0, 'api-calls', '1'), { userId: 0 }],
      ['INVALID_USER_ID', event('r2', -3, 'api-calls', '1'), { userId: -3 }],
      ['INVALID_SERVICE', event('r3', u, '   ', '1'), { service: '   ' }],
      ['INVALID_SERVICE', event('r4', u, 'a\u0000b', '1'), { service: 'a\u0000b' }],
      ['INVALID_SERVICE', event('r5', u, 's'.repeat(101), '1'), { service: 's'.repeat(101) }],
      ['INVALID_QUANTITY', event('r6', u, 'api-calls', 'ten'), { quantity: 'ten' }],
      ['INVALID_QUANTITY', event('r7', u, 'api-calls', ''), { quantity: '' }],
      ['NEGATIVE_QUANTITY', event('r8', u, 'api-calls', '-1'), { quantity: '-1' }],
      ['QUANTITY_TOO_PRECISE', event('r9', u, 'api-calls', '1.0000001'), { quantity: '1.0000001' }],
      ['QUANTITY_OUT_OF_RANGE', event('r10', u, 'api-calls', '1000000000000.000001'), { quantity: '1000000000000.000001' }],
      ['INVALID_TIMESTAMP', event('r11', u, 'api-calls', '1', new Date('1999-12-31T23:59:59Z')), { timestamp: '1999-12-31T23:59:59Z' }],
      ['FUTURE_TIMESTAMP', event('r12', u, 'api-calls', '1', future), { timestamp: future.toISOString() }],
    ];
    const results = await recordUsage(t.usage, [...bad.map(([, e]) => e), { ...event('missing-time', u, 'api-calls', '1'), time: undefined }, event('ok', u, 'api-calls', '1')]);
    expect(brief(results).map(([s, , r]) => `${s}:${r}`)).toEqual([
      ...bad.map(([reason]) => `REJECTED:${reason}`),
      'REJECTED:INVALID_TIMESTAMP',
      'ACCEPTED:',
    ]);
    // The same entries in the usage file are rejected for the same reasons.
    writeNdjson(
      path.join(t.dir, 'usage-logs.json'),
      bad.map(([, , change], i) => ({ id: `file-${i}`, userId: u, service: 'api-calls', quantity: '1', timestamp: '2026-11-02T10:00:00Z', ...change })),
    );
    await processLogs(t);
    const rejected = await usageLogs(t, { status: billingPb.UsageLogStatus.USAGE_LOG_STATUS_REJECTED });
    expect(rejected.map((l) => l.reason)).toEqual(bad.map(([reason]) => reason));
    expect(rejected.every((l) => l.source === billingPb.UsageSource.USAGE_SOURCE_FILE)).toBe(true);
  });

  it('DUPLICATE: the same event again returns the original usage id and changes nothing', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1, '100');
    const batch = [event('d-1', u, 'api-calls', '100'), event('d-2', u, 'storage', '2.5')];
    const first = await recordUsage(t.usage, batch);
    const after = await balances(t, u);
    const again = await recordUsage(t.usage, batch);
    expect(brief(again)).toEqual([
      ['DUPLICATE', first[0].usageId, ''],
      ['DUPLICATE', first[1].usageId, ''],
    ]);
    expect(await balances(t, u)).toEqual(after);
    expect(await usageLogs(t)).toHaveLength(2);
    // Billed, it is still the same usage: answered DUPLICATE, never billed again.
    await processLogs(t);
    expect(brief(await recordUsage(t.usage, batch)).map(([s]) => s)).toEqual(['DUPLICATE', 'DUPLICATE']);
    expect(await processLogs(t)).toMatchObject({ billingRecordsCreated: 0n });
  });

  it('CONFLICT: an id recorded before with another user, service, quantity or time returns the original usage id with EVENT_ID_REUSED', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1, '100');
    const v = await createUser(t, 2, '100');
    const [orig] = await recordUsage(t.usage, [event('c-1', u, 'api-calls', '100')]);
    const before = { u: await balances(t, u), v: await balances(t, v) };
    const results = await recordUsage(t.usage, [
      event('c-1', v, 'api-calls', '100'),
      event('c-1', u, 'storage', '100'),
      event('c-1', u, 'api-calls', '100.000001'),
      event('c-1', u, 'api-calls', '100', new Date(T0.getTime() + 1)),
      event('c-1', u, 'api-calls', '100.000'), // the same quantity written otherwise: the same usage
    ]);
    expect(brief(results)).toEqual([
      ['CONFLICT', orig.usageId, 'EVENT_ID_REUSED'],
      ['CONFLICT', orig.usageId, 'EVENT_ID_REUSED'],
      ['CONFLICT', orig.usageId, 'EVENT_ID_REUSED'],
      ['CONFLICT', orig.usageId, 'EVENT_ID_REUSED'],
      ['DUPLICATE', orig.usageId, ''],
    ]);
    expect({ u: await balances(t, u), v: await balances(t, v) }).toEqual(before);
    const [log] = await usageLogs(t);
    expect({ user: log.userId, quantity: log.quantity }).toEqual({ user: u, quantity: '100' });
  });

  it('PENDING usage of an unknown user is billed once the user exists; NO_PRICE and USER_DELETED usage is never billed', async () => {
    t = await startTestApp({}, { scheduler: false });
    const gone = await createUser(t, 1);
    await call(t.users, 'deleteUser', { id: gone });
    const results = await recordUsage(t.usage, [
      event('early', 2, 'api-calls', '250'), // user 2 does not exist yet
      event('gpu', 2, 'gpu-hours', '1'), // and has no price either: the user comes first, as in the file
      event('late', gone, 'api-calls', '1'),
    ]);
    expect(brief(results).map(([s, , r]) => `${s}:${r}`)).toEqual(['PENDING:UNKNOWN_USER', 'PENDING:UNKNOWN_USER', 'PENDING:USER_DELETED']);
    const u = await createUser(t, 2, '10');
    expect(u).toBe(2n);
    // The unknown user's usage became theirs at once: 250 x 0.01 = 2.50 against the 10.00.
    expect(await balances(t, u)).toEqual({ balance: 10_000_000n, available: 7_500_000n });
    const run = await processLogs(t);
    expect(run).toMatchObject({ billingRecordsCreated: 1n, chargesSucceeded: 1n });
    expect(await balances(t, u)).toEqual({ balance: 7_500_000n, available: 7_500_000n });
    const byId = new Map((await usageLogs(t)).map((l) => [l.eventId, l]));
    expect(byId.get('early')!.status).toBe(billingPb.UsageLogStatus.USAGE_LOG_STATUS_BILLED);
    expect([byId.get('gpu')!.status, byId.get('gpu')!.reason]).toEqual([billingPb.UsageLogStatus.USAGE_LOG_STATUS_PENDING, 'NO_PRICE']);
    expect([byId.get('late')!.status, byId.get('late')!.reason]).toEqual([billingPb.UsageLogStatus.USAGE_LOG_STATUS_PENDING, 'USER_DELETED']);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('a batch over USAGE_BATCH_MAX is INVALID_ARGUMENT/BATCH_TOO_LARGE naming events, and stores nothing; one at the limit is recorded', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    const events = (n: number, prefix: string) => Array.from({ length: n }, (_, i) => event(`${prefix}-${i}`, u, 'api-calls', '1'));
    const err = await expectGrpcError(recordUsage(t.usage, events(1001, 'over')), grpc.status.INVALID_ARGUMENT, 'BATCH_TOO_LARGE');
    expect(err.metadata.get('billing-error-field')).toEqual(['events']);
    expect(await usageLogs(t)).toHaveLength(0);
    const results = await recordUsage(t.usage, events(1000, 'at'));
    expect(results.every((r) => r.status === R.USAGE_EVENT_STATUS_ACCEPTED)).toBe(true);
    expect(new Set(results.map((r) => r.usageId)).size).toBe(1000);
    expect(await usageLogs(t)).toHaveLength(1000);
  });

  it('USAGE_BATCH_MAX sets the limit', async () => {
    t = await startTestApp({ USAGE_BATCH_MAX: '3' }, { scheduler: false });
    const u = await createUser(t, 1);
    await expectGrpcError(
      recordUsage(t.usage, [1, 2, 3, 4].map((i) => event(`m-${i}`, u, 'api-calls', '1'))),
      grpc.status.INVALID_ARGUMENT,
      'BATCH_TOO_LARGE',
    );
    expect(await recordUsage(t.usage, [1, 2, 3].map((i) => event(`m-${i}`, u, 'api-calls', '1')))).toHaveLength(3);
  });

  it('calls cut off by short deadlines and retried record each event once: the retry answers DUPLICATE with the committed id', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1, '1000');
    const batches = Array.from({ length: 30 }, (_, b) => Array.from({ length: 200 }, (_, i) => event(`dl-${b}-${i}`, u, 'api-calls', `${(b % 3) + 1}`)));
    const first = await Promise.all(
      batches.map((events, b) =>
        recordUsage(t.usage, events, { deadlineMs: 1 + (b % 10) * 3 }).then(
          (results) => ({ code: 'OK', results }),
          (err: unknown) => ({ code: codeOf(err), results: [] as usagePb.UsageEventResult[] }),
        ),
      ),
    );
    for (const f of first) expect(['OK', 'DEADLINE_EXCEEDED', 'CANCELLED']).toContain(f.code);
    // Writes that had started when their deadline passed still commit: wait until the stored rows stop changing
    // (on a loaded machine a fixed pause was too short, and a late commit made a retry DUPLICATE unexpectedly).
    let stored = new Map<string, bigint>();
    for (let stable = 0; stable < 3; ) {
      await sleep(150);
      const now = new Map((await usageLogs(t)).map((l) => [l.eventId, l.id]));
      stable = now.size === stored.size ? stable + 1 : 0;
      stored = now;
    }
    const retried = [];
    for (const events of batches) retried.push(await recordUsage(t.usage, events));
    for (const [b, results] of retried.entries()) {
      for (const [i, r] of results.entries()) {
        const id = `dl-${b}-${i}`;
        const committed = stored.get(id);
        // Stored by the first call (answered or not): DUPLICATE with that id. Not stored: ACCEPTED now.
        if (committed !== undefined) expect([id, ...brief([r])[0]]).toEqual([id, 'DUPLICATE', committed, '']);
        else expect([id, brief([r])[0][0]]).toEqual([id, 'ACCEPTED']);
        if (first[b].code === 'OK') expect(r.usageId).toBe(first[b].results[i].usageId);
      }
    }
    const logs = await usageLogs(t);
    expect(logs).toHaveLength(6000);
    expect(new Set(logs.map((l) => l.eventId)).size).toBe(6000);
    const owed = batches.reduce((sum, events, b) => sum + BigInt(events.length) * BigInt((b % 3) + 1), 0n) * 10_000n;
    expect(await balances(t, u)).toEqual({ balance: 1_000_000_000n, available: 1_000_000_000n - owed });
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  (onPostgres ? it : it.skip)(
    'PostgreSQL: a call whose deadline passed while its write waited for a lock commits after all, and its retry answers DUPLICATE with that id',
    async () => {
      t = await startTestApp({}, { scheduler: false });
      const u = await createUser(t, 1, '100');
      const side = new Client({ connectionString: t.app.config.database.kind === 'postgresql' ? t.app.config.database.url : '' });
      await side.connect();
      try {
        await side.query('begin');
        await side.query('select * from wallets where user_id = $1 for update', [String(u)]); // RecordUsage holds the wallet open: it waits
        const late = recordUsage(t.usage, [event('late-1', u, 'api-calls', '7')], { deadlineMs: 300 });
        expect(await late.then(() => 'OK', codeOf)).toBe('DEADLINE_EXCEEDED');
        await side.query('commit');
      } finally {
        await side.end();
      }
      // The write had started: it commits once the lock is gone.
      let stored: billingPb.UsageLog[] = [];
      for (let i = 0; i < 100 && stored.length === 0; i++) {
        await sleep(20);
        stored = await usageLogs(t);
      }
      expect(stored.map((l) => l.eventId)).toEqual(['late-1']);
      expect(brief(await recordUsage(t.usage, [event('late-1', u, 'api-calls', '7')]))).toEqual([['DUPLICATE', stored[0].id, '']]);
      expect(await balances(t, u)).toEqual({ balance: 100_000_000n, available: 99_930_000n });
    },
  );
});

describe('RecordUsage and the usage file: one identity space', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('an event recorded over gRPC and the same id in the usage file are one usage, billed once, in either order', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = Number(await createUser(t, 1, '100'));
    const file = path.join(t.dir, 'usage-logs.json');
    // API first: the file's entry with the same id is a duplicate.
    const [api] = await recordUsage(t.usage, [event('both-1', u, 'api-calls', '100')]);
    writeNdjson(file, [
      { id: 'both-1', userId: u, service: 'api-calls', quantity: 100, timestamp: T0.toISOString() },
      { id: 'both-2', userId: u, service: 'storage', quantity: 4, timestamp: T0.toISOString() },
    ]);
    const run = await processLogs(t);
    expect(run).toMatchObject({ entriesRead: 2n, entriesAccepted: 1n, entriesDuplicate: 1n, billingRecordsCreated: 1n, chargesSucceeded: 1n });
    // File first: the API's event with that id is a DUPLICATE of the file's usage, or a CONFLICT with it.
    const fileRow = (await usageLogs(t)).find((l) => l.eventId === 'both-2')!;
    expect(fileRow.source).toBe(billingPb.UsageSource.USAGE_SOURCE_FILE);
    expect(brief(await recordUsage(t.usage, [event('both-2', u, 'storage', '4'), event('both-2', u, 'storage', '5')]))).toEqual([
      ['DUPLICATE', fileRow.id, ''],
      ['CONFLICT', fileRow.id, 'EVENT_ID_REUSED'],
    ]);
    // One record: 100 x 0.01 (the API's entry, billed by the run) + 4 x 0.05.
    const { billingRecords } = await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 0, pageToken: '' });
    expect(billingRecords).toHaveLength(1);
    expect(micros(billingRecords[0].amount)).toBe(1_200_000n);
    expect(billingRecords[0].lineItems.map((l) => [l.service, l.quantity])).toEqual([
      ['api-calls', '100'],
      ['storage', '4'],
    ]);
    const logs = await usageLogs(t);
    expect(logs.map((l) => [l.eventId, l.status, l.billingRecordId])).toEqual([
      ['both-1', billingPb.UsageLogStatus.USAGE_LOG_STATUS_BILLED, billingRecords[0].id],
      ['both-2', billingPb.UsageLogStatus.USAGE_LOG_STATUS_BILLED, billingRecords[0].id],
    ]);
    expect(logs[0].id).toBe(api.usageId);
    expect(await processLogs(t)).toMatchObject({ billingRecordsCreated: 0n, entriesDuplicate: 2n });
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('a file entry that reuses an API event id with other content is a conflict: counted, not stored, the API usage stands', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = Number(await createUser(t, 1, '100'));
    const [api] = await recordUsage(t.usage, [event('shared-1', u, 'api-calls', '100')]);
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [
      { id: 'shared-1', userId: u, service: 'api-calls', quantity: 100, timestamp: T0.toISOString() }, // the same usage
      { id: 'shared-1', userId: u, service: 'api-calls', quantity: 101, timestamp: T0.toISOString() }, // another quantity
      { id: 'shared-1', userId: u, service: 'api-calls', quantity: 100, timestamp: new Date(T0.getTime() + 1).toISOString() }, // another time
    ]);
    const run = await processLogs(t);
    expect(run).toMatchObject({ entriesRead: 3n, entriesAccepted: 0n, entriesDuplicate: 1n, entriesConflict: 2n, billingRecordsCreated: 1n });
    const logs = await usageLogs(t);
    expect(logs.map((l) => [l.id, l.eventId, l.quantity])).toEqual([[api.usageId, 'shared-1', '100']]);
    const { billingRecords } = await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 0, pageToken: '' });
    expect(billingRecords.map((r) => micros(r.amount))).toEqual([1_000_000n]);
  });

  it('ListUsageLogs filters by source and by usage time range', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = Number(await createUser(t, 1, '100'));
    const at = (h: number) => new Date(T0.getTime() + h * 3_600_000);
    await recordUsage(t.usage, [event('a0', u, 'api-calls', '1', at(0)), event('a1', u, 'api-calls', '1', at(1)), event('a2', u, 'api-calls', '1', at(2))]);
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [0, 1, 2].map((h) => ({ id: `f${h}`, userId: u, service: 'storage', quantity: 1, timestamp: at(h).toISOString() })));
    await processLogs(t);
    const ids = async (f: Partial<billingPb.ListUsageLogsRequest>) => (await usageLogs(t, f)).map((l) => l.eventId);
    expect(await ids({ source: billingPb.UsageSource.USAGE_SOURCE_API })).toEqual(['a0', 'a1', 'a2']);
    expect(await ids({ source: billingPb.UsageSource.USAGE_SOURCE_FILE })).toEqual(['f0', 'f1', 'f2']);
    expect(await ids({ startTime: at(1) })).toEqual(['a1', 'a2', 'f1', 'f2']);
    expect(await ids({ endTime: at(1) })).toEqual(['a0', 'f0']);
    expect(await ids({ startTime: at(1), endTime: at(2), source: billingPb.UsageSource.USAGE_SOURCE_FILE })).toEqual(['f1']);
    await expectGrpcError(
      call(t.billing, 'listUsageLogs', { userId: 0n, status: 0, source: 7 as billingPb.UsageSource, pageSize: 0, pageToken: '' }),
      grpc.status.INVALID_ARGUMENT,
      'INVALID_ENUM',
    );
  });
});

describe('the available balance', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('moves with each batch by the exact priced value of unbilled usage, and after the billing run equals the balance', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1, '1000');
    const v = await createUser(t, 2, '1');
    const random = mulberry32(42);
    const services = ['api-calls', 'storage', 'bandwidth', 'compute', 'gpu-hours'];
    const unbilled = new Map<string, bigint>(); // user/service -> micro-units, the reference
    let n = 0;
    for (let batch = 0; batch < 8; batch++) {
      const events = Array.from({ length: 25 }, () => {
        const user = random() < 0.7 ? u : v;
        const service = services[Math.floor(random() * services.length)];
        const quantity = `${Math.floor(random() * 50)}.${String(Math.floor(random() * 1_000_000)).padStart(6, '0')}`;
        return event(`ab-${n++}`, user, service, quantity);
      });
      const results = await recordUsage(t.usage, events);
      for (const [i, e] of events.entries()) {
        if (results[i].status === R.USAGE_EVENT_STATUS_REJECTED) throw new Error(`unexpected rejection ${results[i].reason}`);
        const key = `${e.userId}/${e.service}`;
        unbilled.set(key, (unbilled.get(key) ?? 0n) + scaled(e.quantity));
      }
      // Right after the batch: balance minus each service's total, priced and rounded once (no price: 0).
      for (const [user, funds] of [
        [u, 1_000_000_000n],
        [v, 1_000_000n],
      ] as const) {
        let owed = 0n;
        for (const [key, q] of unbilled) {
          const [who, service] = key.split('/');
          if (BigInt(who) === user && DEFAULT_PRICES[service] !== undefined) owed += priced(q, DEFAULT_PRICES[service]);
        }
        expect({ batch, user, ...(await balances(t, user)) }).toEqual({ batch, user, balance: funds, available: funds - owed });
      }
    }
    const run = await processLogs(t);
    expect(run.billingRecordsCreated).toBe(2n);
    // Billed: u could pay (PAID), v could not (the record is unpaid): available = balance - unpaid records.
    const { billingRecords } = await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 0, pageToken: '' });
    const recordOf = (user: bigint) => billingRecords.find((r) => r.userId === user)!;
    expect(recordOf(u).status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
    expect(recordOf(v).status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PENDING);
    const uNow = await balances(t, u);
    expect(uNow).toEqual({ balance: 1_000_000_000n - micros(recordOf(u).amount), available: 1_000_000_000n - micros(recordOf(u).amount) });
    expect(await balances(t, v)).toEqual({ balance: 1_000_000n, available: 1_000_000n - micros(recordOf(v).amount) });
    // The record bills what the available balance had counted, line by line (gpu-hours has no price: still PENDING).
    for (const user of [u, v]) {
      for (const line of recordOf(user).lineItems) {
        expect([line.service, scaled(line.quantity)]).toEqual([line.service, unbilled.get(`${user}/${line.service}`)]);
        expect(micros(line.amount)).toBe(priced(unbilled.get(`${user}/${line.service}`)!, DEFAULT_PRICES[line.service]));
      }
    }
    // A top-up settles v's record: both balances agree again.
    await call(t.wallets, 'addFunds', { userId: v, amount: money('1000'), requestId: '' });
    const vNow = await balances(t, v);
    expect(vNow.available).toBe(vNow.balance);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('AddFunds answers with the available balance after the credit', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    await recordUsage(t.usage, [event('af-1', u, 'compute', '3')]); // 0.30
    const res = await call(t.wallets, 'addFunds', { userId: u, amount: money('2'), requestId: 'af' });
    expect({ balance: micros(res.wallet!.balance), available: micros(res.wallet!.availableBalance) }).toEqual({ balance: 2_000_000n, available: 1_700_000n });
    const replay = await call(t.wallets, 'addFunds', { userId: u, amount: money('2'), requestId: 'af' });
    expect(micros(replay.wallet!.availableBalance)).toBe(1_700_000n);
  });

  it('DeleteUser is refused with UNBILLED_USAGE while priced usage waits to be billed', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    await recordUsage(t.usage, [event('del-1', u, 'api-calls', '0')]);
    await recordUsage(t.usage, [event('del-2', u, 'api-calls', '1')]);
    await expectGrpcError(call(t.users, 'deleteUser', { id: u }), grpc.status.FAILED_PRECONDITION, 'UNBILLED_USAGE');
    // Unpriced usage alone does not keep a user.
    const w = await createUser(t, 2);
    await recordUsage(t.usage, [event('del-3', w, 'gpu-hours', '1')]);
    await call(t.users, 'deleteUser', { id: w });
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });
});

describe('GetUsageSummary', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  const summary = (req: Partial<usagePb.GetUsageSummaryRequest>) =>
    call(t.usage, 'getUsageSummary', { userId: 0n, service: '', groupBy: 0, ...req }).then((r) => r.rows);

  it('adds up billed and unbilled usage per service, hour and day exactly as a reference computed here', async () => {
    t = await startTestApp({}, { scheduler: false });
    const users = [await createUser(t, 1, '100000'), await createUser(t, 2, '100000')];
    const random = mulberry32(7);
    const services = ['api-calls', 'storage', 'gpu-hours'];
    const start = new Date('2026-10-01T00:00:00Z').getTime();
    type Ev = { user: bigint; service: string; q: bigint; at: number };
    const all: Ev[] = [];
    const send = async (count: number, prefix: string) => {
      const events = Array.from({ length: count }, (_, i) => {
        const e: Ev = {
          user: users[Math.floor(random() * 2)],
          service: services[Math.floor(random() * services.length)],
          q: BigInt(Math.floor(random() * 10_000_000_000)),
          at: start + Math.floor(random() * 3 * 86_400_000),
        };
        all.push(e);
        const quantity = `${e.q / 1_000_000n}.${String(e.q % 1_000_000n).padStart(6, '0')}`;
        return event(`${prefix}-${i}`, e.user, e.service, quantity, new Date(e.at));
      });
      await recordUsage(t.usage, events);
    };
    await send(400, 'billed');
    await processLogs(t); // these are billed now
    await send(300, 'open'); // and these not yet
    await recordUsage(t.usage, [event('bad', users[0], 'api-calls', '-1', new Date(start))]); // rejected: not counted
    const reference = (keep: (e: Ev) => boolean, period: number | null, from: number) => {
      const rows = new Map<string, { service: string; period: number; q: bigint; n: number }>();
      for (const e of all.filter(keep)) {
        const p = period === null ? from : Math.floor(e.at / period) * period;
        const key = `${e.service}|${String(p).padStart(16, '0')}`;
        const row = rows.get(key) ?? { service: e.service, period: p, q: 0n, n: 0 };
        row.q += e.q;
        row.n++;
        rows.set(key, row);
      }
      return [...rows.keys()].sort().map((k) => {
        const r = rows.get(k)!;
        const price = DEFAULT_PRICES[r.service];
        return { service: r.service, period: new Date(r.period).toISOString(), q: r.q, amount: price === undefined ? 0n : priced(r.q, price), n: r.n };
      });
    };
    const got = (rows: usagePb.UsageSummaryRow[]) =>
      rows.map((r) => ({ service: r.service, period: r.periodStart!.toISOString(), q: scaled(r.quantity), amount: micros(r.amount), n: Number(r.entries) }));
    const from = start + 6 * 3_600_000;
    const to = start + 2 * 86_400_000 + 5 * 3_600_000;
    const inRange = (e: Ev) => e.at >= from && e.at < to;
    const G = usagePb.UsageSummaryGroupBy;
    for (const [groupBy, period] of [
      [G.USAGE_SUMMARY_GROUP_BY_UNSPECIFIED, null],
      [G.USAGE_SUMMARY_GROUP_BY_SERVICE, null],
      [G.USAGE_SUMMARY_GROUP_BY_HOUR, 3_600_000],
      [G.USAGE_SUMMARY_GROUP_BY_DAY, 86_400_000],
    ] as const) {
      expect(got(await summary({ startTime: new Date(from), endTime: new Date(to), groupBy }))).toEqual(reference(inRange, period, from));
      expect(got(await summary({ userId: users[1], startTime: new Date(from), endTime: new Date(to), groupBy }))).toEqual(
        reference((e) => inRange(e) && e.user === users[1], period, from),
      );
      expect(got(await summary({ userId: users[0], service: 'storage', startTime: new Date(from), endTime: new Date(to), groupBy }))).toEqual(
        reference((e) => inRange(e) && e.user === users[0] && e.service === 'storage', period, from),
      );
    }
    expect(await summary({ userId: 999n, startTime: new Date(from), endTime: new Date(to) })).toEqual([]);
  });

  it('refuses a missing, empty, reversed or over-long time range and an unknown group_by with INVALID_ARGUMENT', async () => {
    t = await startTestApp({}, { scheduler: false });
    const a = new Date('2026-01-01T00:00:00Z');
    const cases: [Partial<usagePb.GetUsageSummaryRequest>, string, string][] = [
      [{ endTime: a }, 'MISSING_TIME_RANGE', 'start_time'],
      [{ startTime: a }, 'MISSING_TIME_RANGE', 'end_time'],
      [{ startTime: a, endTime: a }, 'INVALID_TIME_RANGE', 'end_time'],
      [{ startTime: a, endTime: new Date(a.getTime() - 1) }, 'INVALID_TIME_RANGE', 'end_time'],
      [{ startTime: a, endTime: new Date(a.getTime() + 367 * 86_400_000) }, 'INVALID_TIME_RANGE', 'end_time'],
      [{ startTime: a, endTime: new Date(a.getTime() + 1), groupBy: 9 as usagePb.UsageSummaryGroupBy }, 'INVALID_ENUM', 'group_by'],
      [{ startTime: a, endTime: new Date(a.getTime() + 1), userId: -1n }, 'INVALID_ID', 'user_id'],
    ];
    for (const [req, reason, field] of cases) {
      const err = await expectGrpcError(summary(req), grpc.status.INVALID_ARGUMENT, reason);
      expect(err.metadata.get('billing-error-field')).toEqual([field]);
    }
    const ok = await summary({ startTime: a, endTime: new Date(a.getTime() + 366 * 86_400_000) });
    expect(ok).toEqual([]);
  });
});

describe('the billing run bills API usage with file usage', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('ProcessAll makes one record per user per run with one line per service from both sources', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = Number(await createUser(t, 1, '100'));
    await recordUsage(t.usage, [event('x1', u, 'api-calls', '10'), event('x2', u, 'api-calls', '5'), event('x3', u, 'compute', '1')]);
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [{ userId: u, service: 'api-calls', quantity: 5, timestamp: T0.toISOString() }]);
    const res = await call(t.jobs, 'processAll', {}, { deadlineMs: 60_000 });
    expect(res.jobRun!.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED);
    const { billingRecords } = await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 0, pageToken: '' });
    expect(billingRecords).toHaveLength(1);
    expect(billingRecords[0].lineItems.map((l) => [l.service, l.quantity, micros(l.amount)])).toEqual([
      ['api-calls', '20', 200_000n],
      ['compute', '1', 100_000n],
    ]);
    expect(billingRecords[0].status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
    expect(await balances(t, BigInt(u))).toEqual({ balance: 99_700_000n, available: 99_700_000n });
  });
});
