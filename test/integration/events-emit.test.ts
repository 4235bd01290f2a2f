/**
 * Every change writes its event, in the change's own transaction: each event
 * type (but the balance alerts) produced by a test of its cause, its payload
 * checked, read through the events' door (createEventsRepository(db).list).
 * A change that fails or rolls back writes none; a replayed request_id writes
 * none again; cursors become visible in commit order. Both databases.
 */
import * as grpc from '@grpc/grpc-js';
import * as path from 'node:path';
import pino from 'pino';
import * as billingPb from '../../generated/billing/v1/billing_service';
import { openDatabase } from '../../src/db/database';
import { createEventsRepository } from '../../src/events/events.repository';
import { EVENT_TYPES, type EventType, type StoredEvent } from '../../src/events/events.types';
import { createJobRunsRepository } from '../../src/jobs/job-runs.repository';
import { checkInvariants } from '../../src/ops/invariants';
import { allEvents } from '../helpers/events';
import { FakeClock } from '../helpers/fake-clock';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { creditWithoutSettling } from '../helpers/ledger';
import { entry, writeNdjson } from '../helpers/usage';

const R = billingPb.BillingRecordStatus;
const micros = (m?: { units: bigint; nanos: number }) => m!.units * 1_000_000n + BigInt(m!.nanos / 1000);

/** The types this file tests: all but the balance alerts (balance-alerts.test.ts), which top-ups write too. */
const CHANGE_TYPES = EVENT_TYPES.filter((type) => !type.startsWith('balance.'));

/** The events committed after `afterId`, as type + user + ref + payload (ids and times checked apart). */
async function eventsAfter(t: TestApp, afterId: number, types: EventType[] = CHANGE_TYPES) {
  const list = await createEventsRepository(t.app.db).list({ afterId, types }, 10_000);
  return list.map(({ type, userId, refId, payload }) => ({ type, userId, refId, payload }));
}
const lastId = (t: TestApp) => createEventsRepository(t.app.db).lastId();

async function newUser(t: TestApp, n: number, funds = '0'): Promise<number> {
  const { user } = await call(t.users, 'createUser', { email: `e${n}@example.com`, name: `E ${n}`, requestId: '' });
  if (funds !== '0') await call(t.wallets, 'addFunds', { userId: user!.id, amount: money(funds), requestId: '' });
  return Number(user!.id);
}

describe('events of changes', () => {
  let t: TestApp;
  let clock: FakeClock;
  afterEach(async () => {
    if (t) expect((await checkInvariants(t.app.db)).violations).toEqual([]);
    await t?.stop();
  });

  it('user.created, user.suspended, user.reactivated and user.deleted, once per change, replays and no-ops writing none', async () => {
    clock = new FakeClock();
    t = await startTestApp({}, { clock, scheduler: false });
    const before = await lastId(t);
    const { user } = await call(t.users, 'createUser', { email: 'Ann@Example.com', name: ' Ann ', requestId: 'cu-1' });
    const again = await call(t.users, 'createUser', { email: 'Ann@Example.com', name: ' Ann ', requestId: 'cu-1' });
    expect(again.user!.id).toBe(user!.id);
    const id = Number(user!.id);
    await call(t.users, 'suspendUser', { id: user!.id, reason: 'fraud check' });
    await call(t.users, 'suspendUser', { id: user!.id, reason: 'fraud check' }); // changes nothing
    await call(t.users, 'activateUser', { id: user!.id });
    await call(t.users, 'activateUser', { id: user!.id }); // already ACTIVE
    await call(t.users, 'deleteUser', { id: user!.id });
    expect(await eventsAfter(t, before)).toEqual([
      { type: 'user.created', userId: id, refId: null, payload: { name: 'Ann', email: 'ann@example.com' } },
      { type: 'user.suspended', userId: id, refId: null, payload: { reason: 'fraud check', billingRecordId: 0 } },
      { type: 'user.reactivated', userId: id, refId: null, payload: { settled: false } },
      { type: 'user.deleted', userId: id, refId: null, payload: {} },
    ]);
    // Stamped with the change's own clock.
    const stored = await createEventsRepository(t.app.db).list({ afterId: before }, 10);
    expect(stored.map((e) => e.createdAt.getTime())).toEqual(stored.map(() => clock.now().getTime()));
  });

  it('a change that fails writes no event: AddFunds on a deleted user, a delete refused, a duplicate email', async () => {
    t = await startTestApp();
    const gone = await newUser(t, 1);
    await call(t.users, 'deleteUser', { id: BigInt(gone) });
    const rich = await newUser(t, 2, '5');
    const before = await lastId(t);
    await expectGrpcError(call(t.wallets, 'addFunds', { userId: BigInt(gone), amount: money('3'), requestId: 'late' }), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.users, 'deleteUser', { id: BigInt(rich) }), grpc.status.FAILED_PRECONDITION, 'BALANCE_NOT_ZERO');
    await expectGrpcError(
      call(t.users, 'createUser', { email: 'e2@example.com', name: 'Twin', requestId: '' }),
      grpc.status.ALREADY_EXISTS,
      'EMAIL_TAKEN',
    );
    await expectGrpcError(
      call(t.billing, 'createBillingRecord', { userId: BigInt(gone), amount: money('1'), description: 'x', requestId: '' }),
      grpc.status.NOT_FOUND,
      'USER_NOT_FOUND',
    );
    expect(await eventsAfter(t, before)).toEqual([]);
    expect(await lastId(t)).toBe(before);
  });

  it('wallet.credited per AddFunds, with the ledger row as ref, once under replays of its request_id', async () => {
    t = await startTestApp();
    const userId = await newUser(t, 1);
    const before = await lastId(t);
    const first = await call(t.wallets, 'addFunds', { userId: BigInt(userId), amount: money('12.5'), requestId: 'top-1' });
    for (let i = 0; i < 3; i++) {
      const replay = await call(t.wallets, 'addFunds', { userId: BigInt(userId), amount: money('12.5'), requestId: 'top-1' });
      expect(replay.transaction!.id).toBe(first.transaction!.id);
    }
    const second = await call(t.wallets, 'addFunds', { userId: BigInt(userId), amount: money('0.000001'), requestId: '' });
    const txId = Number(first.transaction!.id);
    const txId2 = Number(second.transaction!.id);
    expect(await eventsAfter(t, before)).toEqual([
      { type: 'wallet.credited', userId, refId: txId, payload: { transactionId: txId, amount: 12_500_000n, balanceAfter: 12_500_000n, requestId: 'top-1' } },
      { type: 'wallet.credited', userId, refId: txId2, payload: { transactionId: txId2, amount: 1n, balanceAfter: 12_500_001n, requestId: '' } },
    ]);
  });

  it('CreateBillingRecord: billing_record.created, wallet.debited and billing_record.paid in order, none again on a replay', async () => {
    t = await startTestApp();
    const userId = await newUser(t, 1, '10');
    const before = await lastId(t);
    const res = await call(t.billing, 'createBillingRecord', { userId: BigInt(userId), amount: money('2.5'), description: 'fee', requestId: 'r-1' });
    await call(t.billing, 'createBillingRecord', { userId: BigInt(userId), amount: money('2.5'), description: 'fee', requestId: 'r-1' });
    // Already PAID: ProcessBillingRecord changes nothing and writes nothing.
    await call(t.billing, 'processBillingRecord', { id: res.billingRecord!.id });
    const recordId = Number(res.billingRecord!.id);
    const { transactions } = await call(t.wallets, 'listWalletTransactions', { userId: BigInt(userId), pageSize: 0, pageToken: '' });
    const debit = transactions.find((x) => Number(x.billingRecordId) === recordId)!;
    expect(await eventsAfter(t, before)).toEqual([
      { type: 'billing_record.created', userId, refId: recordId, payload: { billingRecordId: recordId, amount: 2_500_000n, jobRunId: 0 } },
      {
        type: 'wallet.debited',
        userId,
        refId: Number(debit.id),
        payload: { transactionId: Number(debit.id), amount: 2_500_000n, balanceAfter: 7_500_000n, billingRecordId: recordId },
      },
      { type: 'billing_record.paid', userId, refId: recordId, payload: { billingRecordId: recordId, amount: 2_500_000n, attemptCount: 1 } },
    ]);
  });

  it('retries: retry_scheduled, then failed with the user suspended for it, then a top-up pays it and reactivates them (settled)', async () => {
    clock = new FakeClock();
    t = await startTestApp({ MAX_RETRIES: '1', RETRY_BASE_DELAY_MS: '1000' }, { clock, scheduler: false });
    const userId = await newUser(t, 1);
    const before = await lastId(t);
    const res = await call(t.billing, 'createBillingRecord', { userId: BigInt(userId), amount: money('4'), description: 'fee', requestId: '' });
    const recordId = Number(res.billingRecord!.id);
    const due = new Date(clock.now().getTime() + 1000);
    clock.advance(1000);
    const { jobRun } = await call(t.jobs, 'processRetries', {});
    const runId = Number(jobRun!.id);
    const topUp = await call(t.wallets, 'addFunds', { userId: BigInt(userId), amount: money('5'), requestId: '' });
    const creditId = Number(topUp.transaction!.id);
    const { transactions } = await call(t.wallets, 'listWalletTransactions', { userId: BigInt(userId), pageSize: 0, pageToken: '' });
    const debitId = Number(transactions.find((x) => Number(x.billingRecordId) === recordId)!.id);
    const suspendedFor = `non-payment: billing record ${recordId} failed after 2 attempts`;
    expect(await eventsAfter(t, before)).toEqual([
      { type: 'billing_record.created', userId, refId: recordId, payload: { billingRecordId: recordId, amount: 4_000_000n, jobRunId: 0 } },
      {
        type: 'billing_record.retry_scheduled',
        userId,
        refId: recordId,
        payload: { billingRecordId: recordId, attemptCount: 1, nextAttemptTime: due, reason: 'INSUFFICIENT_FUNDS' },
      },
      { type: 'billing_record.failed', userId, refId: recordId, payload: { billingRecordId: recordId, attemptCount: 2, reason: 'INSUFFICIENT_FUNDS' } },
      { type: 'user.suspended', userId, refId: null, payload: { reason: suspendedFor, billingRecordId: recordId } },
      { type: 'job_run.finished', userId: 0, refId: runId, payload: { jobRunId: runId, kind: 'PROCESS_RETRIES', status: 'SUCCEEDED', errorMessage: '' } },
      { type: 'wallet.credited', userId, refId: creditId, payload: { transactionId: creditId, amount: 5_000_000n, balanceAfter: 5_000_000n, requestId: '' } },
      { type: 'wallet.debited', userId, refId: debitId, payload: { transactionId: debitId, amount: 4_000_000n, balanceAfter: 1_000_000n, billingRecordId: recordId } },
      { type: 'billing_record.paid', userId, refId: recordId, payload: { billingRecordId: recordId, amount: 4_000_000n, attemptCount: 2 } },
      { type: 'user.reactivated', userId, refId: null, payload: { settled: true } },
    ]);
  });

  it('a billing run: billing_record.created with its job run for each record, one wallet.debited per ledger row of the batch, job_run.finished', async () => {
    t = await startTestApp();
    const users = [await newUser(t, 1, '100'), await newUser(t, 2, '100'), await newUser(t, 3, '100')];
    writeNdjson(
      path.join(t.dir, 'usage-logs.json'),
      users.flatMap((u, i) => [entry(u, 'api-calls', 1000 * (i + 1)), entry(u, 'storage', i + 1)]),
    );
    const before = await lastId(t);
    const { jobRun } = await call(t.jobs, 'processLogs', {});
    const runId = Number(jobRun!.id);
    const { billingRecords } = await call(t.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 100, pageToken: '' });
    expect(billingRecords.map((r) => r.status)).toEqual(users.map(() => R.BILLING_RECORD_STATUS_PAID));
    const got = await eventsAfter(t, before);
    const created = got.filter((e) => e.type === 'billing_record.created');
    expect(created).toEqual(
      billingRecords.map((r) => ({
        type: 'billing_record.created',
        userId: Number(r.userId),
        refId: Number(r.id),
        payload: { billingRecordId: Number(r.id), amount: micros(r.amount), jobRunId: runId },
      })),
    );
    // The batch's debits (debitMany): each event names its own ledger row.
    const debits: unknown[] = [];
    for (const u of users) {
      const { transactions } = await call(t.wallets, 'listWalletTransactions', { userId: BigInt(u), pageSize: 0, pageToken: '' });
      for (const x of transactions.filter((x) => x.billingRecordId !== undefined && Number(x.billingRecordId) > 0)) {
        debits.push({
          type: 'wallet.debited',
          userId: u,
          refId: Number(x.id),
          payload: { transactionId: Number(x.id), amount: micros(x.amount), balanceAfter: micros(x.balanceAfter), billingRecordId: Number(x.billingRecordId) },
        });
      }
    }
    const byRef = (a: { refId: number | null }, b: { refId: number | null }) => a.refId! - b.refId!;
    expect(got.filter((e) => e.type === 'wallet.debited').sort(byRef)).toEqual((debits as { refId: number }[]).sort(byRef));
    expect(got.filter((e) => e.type === 'billing_record.paid').map((e) => e.refId)).toEqual(billingRecords.map((r) => Number(r.id)));
    expect(got[got.length - 1]).toEqual({
      type: 'job_run.finished',
      userId: 0,
      refId: runId,
      payload: { jobRunId: runId, kind: 'PROCESS_LOGS', status: 'SUCCEEDED', errorMessage: '' },
    });
    // A run with nothing new bills nothing: its only event is its end.
    const idle = await lastId(t);
    const { jobRun: second } = await call(t.jobs, 'processLogs', {});
    expect((await eventsAfter(t, idle)).map((e) => [e.type, e.refId])).toEqual([['job_run.finished', Number(second!.id)]]);
  });

  it('job_run.finished (FAILED) for a run reaped after its lease, and for one closed as interrupted at start-up', async () => {
    clock = new FakeClock();
    t = await startTestApp({}, { clock, scheduler: false, jobLeaseMs: 60_000 });
    const events = createEventsRepository(t.app.db);
    const runs = createJobRunsRepository(t.app.db, events);
    const abandoned = (await runs.claim('PROCESS_LOGS', 'rpc', null, clock.now()))!;
    clock.advance(61_000);
    const before = await lastId(t);
    await t.app.services.jobs.reapAbandonedRuns();
    await t.app.services.jobs.reapAbandonedRuns(); // nothing left to reap: no second event
    const interrupted = (await runs.claim('PROCESS_RETRIES', 'rpc', null, clock.now()))!;
    await t.app.services.jobs.closeInterruptedRuns();
    const got = await eventsAfter(t, before);
    expect(got.map((e) => [e.type, e.refId, (e.payload as { status: string }).status, (e.payload as { kind: string }).kind])).toEqual([
      ['job_run.finished', abandoned.id, 'FAILED', 'PROCESS_LOGS'],
      ['job_run.finished', interrupted.id, 'FAILED', 'PROCESS_RETRIES'],
    ]);
    expect((got[0].payload as { errorMessage: string }).errorMessage).toMatch(/^abandoned: /);
    expect((got[1].payload as { errorMessage: string }).errorMessage).toMatch(/^interrupted: /);
  });

  it('concurrent charges of one record: one debit and one paid event, however many callers race', async () => {
    t = await startTestApp({}, { scheduler: false });
    const userId = await newUser(t, 1);
    const res = await call(t.billing, 'createBillingRecord', { userId: BigInt(userId), amount: money('3'), description: 'fee', requestId: '' });
    expect(res.billingRecord!.status).toBe(R.BILLING_RECORD_STATUS_PENDING);
    const recordId = Number(res.billingRecord!.id);
    // Funds arrive without the settlement AddFunds runs, then eight callers charge the record at once.
    await creditWithoutSettling(t, BigInt(userId), 3_000_000n);
    const before = await lastId(t);
    await Promise.all(Array.from({ length: 8 }, () => call(t.billing, 'processBillingRecord', { id: BigInt(recordId) })));
    const got = await eventsAfter(t, before);
    expect(got.map((e) => [e.type, e.type === 'wallet.debited' ? (e.payload as { billingRecordId: number }).billingRecordId : e.refId])).toEqual([
      ['wallet.debited', recordId],
      ['billing_record.paid', recordId],
    ]);
  });

  it('cursors become visible in commit order: a reader never sees a smaller id appear after a larger one', async () => {
    t = await startTestApp({}, { scheduler: false });
    const users = await Promise.all(Array.from({ length: 8 }, (_, i) => newUser(t, i + 1)));
    const before = await lastId(t);
    // The reader on connections of its own, as a consumer of the stream would be (not queued behind the writers).
    const side = await openDatabase(t.app.config.database, pino({ level: 'silent' }), { migrate: false });
    const events = createEventsRepository(side);
    const snapshots: number[][] = [];
    let writing = true;
    const reader = (async () => {
      while (writing) {
        snapshots.push((await events.list({ afterId: before }, 10_000)).map((e) => e.id));
        await new Promise((r) => setImmediate(r));
      }
    })();
    // CreateUser writes its event early in its transaction (then the wallet, the usage locks, the request_id), AddFunds late.
    await Promise.all([
      ...Array.from({ length: 120 }, (_, k) => call(t.users, 'createUser', { email: `c${k}@example.com`, name: `C ${k}`, requestId: `cu-${k}` })),
      ...Array.from({ length: 120 }, (_, k) => call(t.wallets, 'addFunds', { userId: BigInt(users[k % users.length]), amount: money('1'), requestId: `c-${k}` })),
    ]);
    writing = false;
    await reader;
    await side.close();
    const final: StoredEvent[] = await allEvents(t.app.db);
    const ids = final.map((e) => e.id).filter((id) => id > before);
    // 240 changes (each user's first top-up also writes balance.recovered: a new user starts depleted).
    expect(final.filter((e) => e.id > before && !e.type.startsWith('balance.'))).toHaveLength(240);
    expect(ids.every((id, i) => i === 0 || id > ids[i - 1])).toBe(true);
    // Each look saw a prefix of the final order: nothing committed later took a place before what was seen.
    const notPrefix = snapshots.filter((seen) => seen.some((id, i) => id !== ids[i]));
    expect({ looks: snapshots.length > 1, notPrefix }).toEqual({ looks: true, notPrefix: [] });
  });
});
