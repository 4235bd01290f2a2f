import * as grpc from '@grpc/grpc-js';
import * as path from 'node:path';
import * as fs from 'node:fs';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as userPb from '../../generated/billing/v1/user_service';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { requestHash } from '../../src/db/idempotency';
import { checkInvariants } from '../../src/ops/invariants';
import { FakeClock } from '../helpers/fake-clock';
import { creditWithoutSettling } from '../helpers/ledger';
import { entry, writeNdjson } from '../helpers/usage';

const R = billingPb.BillingRecordStatus;
const O = billingPb.ChargeOutcome;
const amountOf = (m?: { units: bigint; nanos: number }) => `${m!.units}.${String(m!.nanos / 1000).padStart(6, '0')}`;

async function newUser(t: TestApp, funds: string, n = 1): Promise<bigint> {
  const { user } = await call(t.users, 'createUser', { email: `u${n}-${Date.now()}@example.com`, name: 'U', requestId: '' });
  if (funds !== '0') await call(t.wallets, 'addFunds', { userId: user!.id, amount: money(funds), requestId: '' });
  return user!.id;
}

const createRecord = (t: TestApp, userId: bigint, amount: string, requestId = '') =>
  call(t.billing, 'createBillingRecord', { userId, amount: money(amount), description: 'manual charge', requestId });

/** Every money invariant holds (balances equal ledgers, one debit per PAID record, ...): src/ops/invariants.ts. */
async function invariantsHold(t: TestApp): Promise<void> {
  expect((await checkInvariants(t.app.db)).violations).toEqual([]);
}

describe('charging', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('CreateBillingRecord charges at once: PAID, one DEBIT ledger row, balance reduced', async () => {
    t = await startTestApp();
    const userId = await newUser(t, '10');
    const res = await createRecord(t, userId, '2.50');
    expect(res.outcome).toBe(O.CHARGE_OUTCOME_CHARGED);
    expect(res.billingRecord!.status).toBe(R.BILLING_RECORD_STATUS_PAID);
    expect(res.billingRecord!.paidTime).toBeInstanceOf(Date);
    expect(res.billingRecord!.attemptCount).toBe(1);
    const { transactions } = await call(t.wallets, 'listWalletTransactions', { userId, pageSize: 0, pageToken: '' });
    const debits = transactions.filter((x) => x.billingRecordId === res.billingRecord!.id);
    expect(debits.map((d) => [amountOf(d.amount), amountOf(d.balanceAfter)])).toEqual([['2.500000', '7.500000']]);
    await invariantsHold(t);
  });

  it('CreateBillingRecord rejects bad input with the right codes', async () => {
    t = await startTestApp();
    const userId = await newUser(t, '0');
    await expectGrpcError(createRecord(t, userId, '0'), grpc.status.INVALID_ARGUMENT, 'NON_POSITIVE_AMOUNT');
    await expectGrpcError(
      call(t.billing, 'createBillingRecord', { userId, amount: money('1'), description: ' ', requestId: '' }),
      grpc.status.INVALID_ARGUMENT,
      'MISSING_DESCRIPTION',
    );
    await expectGrpcError(createRecord(t, 999n, '1'), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(
      call(t.billing, 'createBillingRecord', { userId, amount: { currencyCode: 'EUR', units: 1n, nanos: 0 }, description: 'x', requestId: '' }),
      grpc.status.INVALID_ARGUMENT,
      'CURRENCY_MISMATCH',
    );
  });

  it('CreateBillingRecord with a request_id creates and charges once', async () => {
    t = await startTestApp();
    const userId = await newUser(t, '10');
    const first = await createRecord(t, userId, '3', 'rec-1');
    const again = await createRecord(t, userId, '3', 'rec-1');
    expect(again.billingRecord!.id).toBe(first.billingRecord!.id);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('7.000000');
    await expectGrpcError(createRecord(t, userId, '4', 'rec-1'), grpc.status.ALREADY_EXISTS, 'REQUEST_ID_REUSED');
  });

  it('GetBillingRecord and ProcessBillingRecord return NOT_FOUND for an unknown record', async () => {
    t = await startTestApp();
    await expectGrpcError(call(t.billing, 'getBillingRecord', { id: 42n }), grpc.status.NOT_FOUND, 'BILLING_RECORD_NOT_FOUND');
    await expectGrpcError(call(t.billing, 'processBillingRecord', { id: 42n }), grpc.status.NOT_FOUND, 'BILLING_RECORD_NOT_FOUND');
    await expectGrpcError(call(t.billing, 'getBillingRecord', { id: 0n }), grpc.status.INVALID_ARGUMENT, 'INVALID_ID');
  });

  it('ProcessBillingRecord on a PAID record is ALREADY_PAID and charges nothing', async () => {
    t = await startTestApp();
    const userId = await newUser(t, '10');
    const { billingRecord } = await createRecord(t, userId, '1');
    const res = await call(t.billing, 'processBillingRecord', { id: billingRecord!.id });
    expect(res.outcome).toBe(O.CHARGE_OUTCOME_ALREADY_PAID);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('9.000000');
  });

  it('ListBillingRecords filters by user and status and pages in id order', async () => {
    t = await startTestApp();
    const rich = await newUser(t, '100', 1);
    const poor = await newUser(t, '0', 2);
    for (let i = 0; i < 3; i++) await createRecord(t, rich, '1');
    await createRecord(t, poor, '1');
    const paid = await call(t.billing, 'listBillingRecords', { userId: 0n, status: R.BILLING_RECORD_STATUS_PAID, pageSize: 2, pageToken: '' });
    expect(paid.billingRecords.map((r) => r.userId)).toEqual([rich, rich]);
    const rest = await call(t.billing, 'listBillingRecords', { userId: 0n, status: R.BILLING_RECORD_STATUS_PAID, pageSize: 2, pageToken: paid.nextPageToken });
    expect(rest.billingRecords).toHaveLength(1);
    expect(rest.nextPageToken).toBe('');
    const pending = await call(t.billing, 'listBillingRecords', { userId: poor, status: 0, pageSize: 0, pageToken: '' });
    expect(pending.billingRecords.map((r) => r.status)).toEqual([R.BILLING_RECORD_STATUS_PENDING]);
    await expectGrpcError(
      call(t.billing, 'listBillingRecords', { userId: 0n, status: 99 as billingPb.BillingRecordStatus, pageSize: 0, pageToken: '' }),
      grpc.status.INVALID_ARGUMENT,
      'INVALID_ENUM',
    );
  });

  it('200 concurrent ProcessBillingRecord calls over 20 records charge each exactly once', async () => {
    t = await startTestApp({}, { scheduler: false });
    const userId = await newUser(t, '0');
    const ids: bigint[] = [];
    for (let i = 0; i < 20; i++) ids.push((await createRecord(t, userId, '1')).billingRecord!.id); // short: PENDING
    await creditWithoutSettling(t, userId, 20_000_000n); // exactly enough for all 20
    const results = await Promise.all(Array.from({ length: 200 }, (_, i) => call(t.billing, 'processBillingRecord', { id: ids[i % 20] })));
    const outcomes = results.map((r) => r.outcome);
    expect(outcomes.filter((o) => o === O.CHARGE_OUTCOME_CHARGED)).toHaveLength(20);
    expect(outcomes.filter((o) => o === O.CHARGE_OUTCOME_ALREADY_PAID)).toHaveLength(180);
    const charged = new Set(results.filter((r) => r.outcome === O.CHARGE_OUTCOME_CHARGED).map((r) => r.billingRecord!.id));
    expect(charged.size).toBe(20);
    const debits = await t.app.db.fork().execute<{ n: number }[]>(`select count(*) as n from wallet_transactions where type = 'DEBIT'`);
    expect(Number(debits[0].n)).toBe(20);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('0.000000');
    await invariantsHold(t);
  });

  it('concurrent charges of different records share COMMITs on SQLite (group commit); on PostgreSQL each is its own transaction', async () => {
    t = await startTestApp({}, { scheduler: false });
    const userId = await newUser(t, '0');
    const ids: bigint[] = [];
    for (let i = 0; i < 40; i++) ids.push((await createRecord(t, userId, '1')).billingRecord!.id); // short: PENDING
    await creditWithoutSettling(t, userId, 40_000_000n);
    const before = t.app.db.committedTransactions();
    const results = await Promise.all(ids.map((id) => call(t.billing, 'processBillingRecord', { id })));
    const commits = t.app.db.committedTransactions() - before;
    expect(results.filter((r) => r.outcome === O.CHARGE_OUTCOME_CHARGED)).toHaveLength(40);
    if (t.app.db.dialect === 'sqlite') expect(commits).toBeLessThanOrEqual(10);
    else expect(commits).toBeGreaterThanOrEqual(40);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('0.000000');
    await invariantsHold(t);
  });

  it('concurrent CreateBillingRecord calls share COMMITs on SQLite, for the records and for their first attempts', async () => {
    t = await startTestApp({}, { scheduler: false });
    const userId = await newUser(t, '40');
    const before = t.app.db.committedTransactions();
    const results = await Promise.all(Array.from({ length: 40 }, (_, i) => createRecord(t, userId, '1', `shared-${i}`)));
    const commits = t.app.db.committedTransactions() - before;
    expect(results.filter((r) => r.outcome === O.CHARGE_OUTCOME_CHARGED)).toHaveLength(40);
    // Each call: its record, then its first attempt; 80 transactions when each is its own.
    if (t.app.db.dialect === 'sqlite') expect(commits).toBeLessThanOrEqual(20);
    else expect(commits).toBeGreaterThanOrEqual(80);
    const again = await createRecord(t, userId, '1', 'shared-7');
    expect(again.billingRecord!.id).toBe(results[7].billingRecord!.id);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('0.000000');
    await invariantsHold(t);
  });
});

describe('retries, suspension and settlement (injected clock)', () => {
  let t: TestApp;
  let clock: FakeClock;
  afterEach(async () => t?.stop());

  const retries = async () => (await call(t.jobs, 'processRetries', {})).jobRun!;
  const record = async (id: bigint) => (await call(t.billing, 'getBillingRecord', { id })).billingRecord!;

  it('retries at +1, +2, +4, +8, +16 s, then FAILED and SUSPENDED exactly once (6 attempts)', async () => {
    clock = new FakeClock();
    t = await startTestApp({}, { clock, scheduler: false });
    const userId = await newUser(t, '1');
    const created = await createRecord(t, userId, '5');
    expect(created.outcome).toBe(O.CHARGE_OUTCOME_RETRY_SCHEDULED);
    const id = created.billingRecord!.id;
    const start = clock.now().getTime();
    let elapsed = 0;
    for (const [i, delay] of [1000, 2000, 4000, 8000, 16000].entries()) {
      const r = await record(id);
      expect(r.attemptCount).toBe(i + 1);
      expect(r.nextAttemptTime!.getTime() - start).toBe(elapsed + delay);
      expect(r.failureReason).toBe('INSUFFICIENT_FUNDS');
      clock.advance(delay - 1);
      expect((await retries()).retriesScheduled + (await retries()).recordsFailed).toBe(0n); // not due yet
      clock.advance(1);
      elapsed += delay;
      const run = await retries();
      expect(run.retriesScheduled + run.recordsFailed).toBe(1n);
    }
    const failed = await record(id);
    expect([failed.status, failed.attemptCount, failed.nextAttemptTime]).toEqual([R.BILLING_RECORD_STATUS_FAILED, 6, undefined]);
    const { user } = await call(t.users, 'getUser', { id: userId });
    expect(user!.status).toBe(userPb.UserStatus.USER_STATUS_SUSPENDED);
    expect(user!.suspensionReason).toMatch(/non-payment/);
    clock.advance(3600_000);
    const after = await retries();
    expect([after.retriesScheduled, after.recordsFailed, after.usersSuspended]).toEqual([0n, 0n, 0n]);
    expect((await record(id)).attemptCount).toBe(6);
  });

  it('a restart mid-schedule resumes where it stopped', async () => {
    clock = new FakeClock();
    const dir = fs.mkdtempSync(path.join(require('node:os').tmpdir(), 'billing-restart-'));
    const env = { DB_PATH: path.join(dir, 'b.db') };
    t = await startTestApp(env, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    const id = (await createRecord(t, userId, '5')).billingRecord!.id;
    clock.advance(1000);
    await retries();
    expect((await record(id)).attemptCount).toBe(2);
    await t.stop();
    t = await startTestApp(env, { clock, scheduler: false });
    expect((await record(id)).attemptCount).toBe(2);
    clock.advance(2000);
    await retries();
    const r = await record(id);
    expect(r.attemptCount).toBe(3);
    expect(r.nextAttemptTime!.getTime()).toBe(clock.now().getTime() + 4000);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('ProcessBillingRecord counts an attempt on a PENDING record; on a FAILED record it stays FAILED while short', async () => {
    clock = new FakeClock();
    t = await startTestApp({ MAX_RETRIES: '1' }, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    const id = (await createRecord(t, userId, '5')).billingRecord!.id;
    const second = await call(t.billing, 'processBillingRecord', { id });
    expect([second.outcome, second.billingRecord!.status, second.billingRecord!.attemptCount]).toEqual([
      O.CHARGE_OUTCOME_FAILED,
      R.BILLING_RECORD_STATUS_FAILED,
      2,
    ]);
    const third = await call(t.billing, 'processBillingRecord', { id });
    expect([third.outcome, third.billingRecord!.status]).toEqual([O.CHARGE_OUTCOME_FAILED, R.BILLING_RECORD_STATUS_FAILED]);
  });

  it('AddFunds settles unpaid records oldest first and reactivates a user suspended for non-payment', async () => {
    clock = new FakeClock();
    t = await startTestApp({ MAX_RETRIES: '0' }, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    const a = (await createRecord(t, userId, '3')).billingRecord!; // FAILED at once (no retries), user suspended
    const b = (await createRecord(t, userId, '4')).billingRecord!;
    expect([a.status, b.status]).toEqual([R.BILLING_RECORD_STATUS_FAILED, R.BILLING_RECORD_STATUS_FAILED]);
    expect((await call(t.users, 'getUser', { id: userId })).user!.status).toBe(userPb.UserStatus.USER_STATUS_SUSPENDED);
    const first = await call(t.wallets, 'addFunds', { userId, amount: money('3.5'), requestId: '' });
    // The response says what the top-up paid and what is left to spend after it.
    expect(first.settledBillingRecordIds).toEqual([a.id]);
    expect(amountOf(first.wallet!.balance)).toBe('0.500000');
    expect(amountOf(first.transaction!.balanceAfter)).toBe('3.500000'); // the CREDIT row itself
    expect((await record(a.id)).status).toBe(R.BILLING_RECORD_STATUS_PAID);
    expect((await record(b.id)).status).toBe(R.BILLING_RECORD_STATUS_FAILED);
    expect((await call(t.users, 'getUser', { id: userId })).user!.status).toBe(userPb.UserStatus.USER_STATUS_SUSPENDED);
    const second = await call(t.wallets, 'addFunds', { userId, amount: money('3.5'), requestId: '' });
    expect(second.settledBillingRecordIds).toEqual([b.id]);
    expect(amountOf(second.wallet!.balance)).toBe('0.000000');
    expect((await record(b.id)).status).toBe(R.BILLING_RECORD_STATUS_PAID);
    const nothing = await call(t.wallets, 'addFunds', { userId, amount: money('1'), requestId: '' });
    expect([nothing.settledBillingRecordIds, amountOf(nothing.wallet!.balance)]).toEqual([[], '1.000000']);
    const { user } = await call(t.users, 'getUser', { id: userId });
    expect([user!.status, user!.suspensionReason]).toEqual([userPb.UserStatus.USER_STATUS_ACTIVE, '']);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('1.000000');
    await invariantsHold(t);
  });

  it('a replayed AddFunds settles what the first call, cut off after its commit, did not', async () => {
    clock = new FakeClock();
    t = await startTestApp({ MAX_RETRIES: '0' }, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    const failed = (await createRecord(t, userId, '3')).billingRecord!;
    expect(failed.status).toBe(R.BILLING_RECORD_STATUS_FAILED);
    // The first AddFunds committed its credit and request_id, then the process died before settling.
    await creditWithoutSettling(t, userId, 5_000_000n);
    const [credit] = await t.app.db.fork().execute<{ id: number }[]>(`select max(id) as id from wallet_transactions`);
    await t.app.db.fork().execute(
      `insert into idempotency_keys (scope, request_id, request_hash, resource_id, created_at) values ('AddFunds', 'cut-1', ?, ?, 0)`,
      [requestHash({ userId: Number(userId), amount: 5_000_000n }), Number(credit.id)],
    );
    const replay = await call(t.wallets, 'addFunds', { userId, amount: money('5'), requestId: 'cut-1' });
    expect(replay.transaction!.id).toBe(BigInt(credit.id)); // the first response, no second credit
    expect(replay.settledBillingRecordIds).toEqual([failed.id]); // what this replay's settlement paid
    expect(amountOf(replay.wallet!.balance)).toBe('2.000000');
    expect((await record(failed.id)).status).toBe(R.BILLING_RECORD_STATUS_PAID);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('2.000000');
    expect((await call(t.users, 'getUser', { id: userId })).user!.status).toBe(userPb.UserStatus.USER_STATUS_ACTIVE);
    await invariantsHold(t);
  });

  it('a record settled after it FAILED keeps its attempt count: 6 attempts, the settlement is not one', async () => {
    clock = new FakeClock();
    t = await startTestApp({}, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    const id = (await createRecord(t, userId, '5')).billingRecord!.id;
    for (const delay of [1000, 2000, 4000, 8000, 16000]) {
      clock.advance(delay);
      await retries();
    }
    expect([(await record(id)).status, (await record(id)).attemptCount]).toEqual([R.BILLING_RECORD_STATUS_FAILED, 6]);
    await call(t.wallets, 'addFunds', { userId, amount: money('5'), requestId: '' });
    const paid = await record(id);
    expect([paid.status, paid.attemptCount]).toEqual([R.BILLING_RECORD_STATUS_PAID, 6]);
  });

  it('ProcessRetries settles an unpaid record that a committed top-up did not settle (its settlement failed)', async () => {
    clock = new FakeClock();
    t = await startTestApp({ MAX_RETRIES: '0' }, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    const failed = (await createRecord(t, userId, '3')).billingRecord!;
    const other = await newUser(t, '0');
    const short = (await createRecord(t, other, '3')).billingRecord!;
    expect([failed.status, short.status]).toEqual([R.BILLING_RECORD_STATUS_FAILED, R.BILLING_RECORD_STATUS_FAILED]);
    // The credit committed; the settlement that should have followed never ran.
    await creditWithoutSettling(t, userId, 5_000_000n);
    await creditWithoutSettling(t, other, 1_000_000n); // not enough: nothing to settle
    const run = await retries();
    expect(run.chargesSucceeded).toBe(1n);
    expect([(await record(failed.id)).status, (await record(short.id)).status]).toEqual([
      R.BILLING_RECORD_STATUS_PAID,
      R.BILLING_RECORD_STATUS_FAILED,
    ]);
    expect((await call(t.users, 'getUser', { id: userId })).user!.status).toBe(userPb.UserStatus.USER_STATUS_ACTIVE);
    expect(amountOf((await call(t.wallets, 'getBalance', { userId })).balance)).toBe('2.000000');
    await invariantsHold(t);
  });

  it('a manual suspension is not lifted by settlement', async () => {
    clock = new FakeClock();
    t = await startTestApp({}, { clock, scheduler: false });
    const userId = await newUser(t, '0');
    await createRecord(t, userId, '1');
    await call(t.users, 'suspendUser', { id: userId, reason: 'fraud review' });
    await call(t.wallets, 'addFunds', { userId, amount: money('5'), requestId: '' });
    const { user } = await call(t.users, 'getUser', { id: userId });
    expect([user!.status, user!.suspensionReason]).toEqual([userPb.UserStatus.USER_STATUS_SUSPENDED, 'fraud review']);
  });
});

describe('the real-time retry scheduler', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  async function waitFor<T>(read: () => Promise<T>, done: (v: T) => boolean, ms = 15_000): Promise<T> {
    const until = Date.now() + ms;
    for (;;) {
      const v = await read();
      if (done(v) || Date.now() > until) return v;
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  it('fires each retry when due without a trigger, then fails the record and suspends the user', async () => {
    t = await startTestApp({ RETRY_BASE_DELAY_MS: '50', MAX_RETRIES: '3' });
    const userId = await newUser(t, '0');
    const id = (await createRecord(t, userId, '1')).billingRecord!.id;
    const r = await waitFor(
      async () => (await call(t.billing, 'getBillingRecord', { id })).billingRecord!,
      (rec) => rec.status === R.BILLING_RECORD_STATUS_FAILED,
    );
    expect([r.status, r.attemptCount]).toEqual([R.BILLING_RECORD_STATUS_FAILED, 4]);
    expect((await call(t.users, 'getUser', { id: userId })).user!.status).toBe(userPb.UserStatus.USER_STATUS_SUSPENDED);
    const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 0, pageToken: '' });
    expect(jobRuns.filter((j) => j.trigger === 'scheduler').length).toBeGreaterThanOrEqual(3);
  });

  it('a retry that finds funds charges the record', async () => {
    t = await startTestApp({ RETRY_BASE_DELAY_MS: '200', MAX_RETRIES: '5' });
    const userId = await newUser(t, '0');
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [entry(Number(userId), 'api-calls', 100)]);
    const run = (await call(t.jobs, 'processLogs', {})).jobRun!;
    expect(run.retriesScheduled).toBe(1n);
    await creditWithoutSettling(t, userId, 1_000_000n); // only the scheduler can charge it now
    const [rec] = (await call(t.billing, 'listBillingRecords', { userId, status: 0, pageSize: 0, pageToken: '' })).billingRecords;
    const paid = await waitFor(
      async () => (await call(t.billing, 'getBillingRecord', { id: rec.id })).billingRecord!,
      (r) => r.status === R.BILLING_RECORD_STATUS_PAID,
    );
    expect(paid.attemptCount).toBe(2);
  });

  it('settles by itself a FAILED record whose wallet can pay now, with no top-up call and no trigger', async () => {
    t = await startTestApp({ MAX_RETRIES: '0' }, { schedulerPollMs: 300 });
    const userId = await newUser(t, '0');
    const failed = (await createRecord(t, userId, '2')).billingRecord!;
    expect(failed.status).toBe(R.BILLING_RECORD_STATUS_FAILED);
    await creditWithoutSettling(t, userId, 2_000_000n); // a top-up whose settlement failed after its commit
    const paid = await waitFor(
      async () => (await call(t.billing, 'getBillingRecord', { id: failed.id })).billingRecord!,
      (r) => r.status === R.BILLING_RECORD_STATUS_PAID,
    );
    expect([paid.status, paid.attemptCount]).toEqual([R.BILLING_RECORD_STATUS_PAID, 1]);
    expect((await call(t.users, 'getUser', { id: userId })).user!.status).toBe(userPb.UserStatus.USER_STATUS_ACTIVE);
  });
});
