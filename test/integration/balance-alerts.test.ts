/**
 * Balance alerts against the running server: every crossing of the available
 * balance against the threshold writes its events once, with the available
 * balance and threshold of that moment, whatever moved it (usage over gRPC, a
 * top-up, a usage file, a manual record, a new threshold), also under many
 * concurrent writers of one user (rows locked on PostgreSQL, one writer on
 * SQLite); the RPCs' answers and errors.
 */
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { createEventsRepository } from '../../src/events/events.repository';
import type { StoredEvent } from '../../src/events/events.types';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { writeNdjson } from '../helpers/usage';
import { event, micros, recordUsage } from '../helpers/usage-api';

const S = walletPb.BalanceAlertState;
const ALERT_TYPES = ['balance.low', 'balance.recovered', 'balance.depleted'] as const;
/** 1.00 in micros. */
const U = 1_000_000n;

/** The user's alert events, oldest first, as [type, available, threshold] (threshold null for depleted). */
async function alertsOf(t: TestApp, userId: bigint): Promise<[string, bigint, bigint | null][]> {
  const events = await createEventsRepository(t.app.db).list({ afterId: 0, userId: Number(userId), types: [...ALERT_TYPES] }, 1000);
  return events.map((e: StoredEvent) => {
    const p = e.payload as { availableBalance: bigint; threshold?: bigint };
    return [e.type, p.availableBalance, p.threshold ?? null];
  });
}

async function createUser(t: TestApp, n: number): Promise<bigint> {
  const { user } = await call(t.users, 'createUser', { email: `a${n}@example.com`, name: `A${n}`, requestId: '' });
  return user!.id;
}

const addFunds = (t: TestApp, userId: bigint, amount: string) => call(t.wallets, 'addFunds', { userId, amount: money(amount), requestId: '' });
/** api-calls cost 0.01 each (default PRICING): `cost` in units of the currency as api-calls. */
let seq = 0;
const spend = (t: TestApp, userId: bigint, cost: number) => recordUsage(t.usage, [event(`ev-${++seq}`, userId, 'api-calls', String(cost * 100), new Date())]);
const getAlert = async (t: TestApp, userId: bigint) => (await call(t.wallets, 'getBalanceAlert', { userId })).alert!;
const available = async (t: TestApp, userId: bigint) => micros((await call(t.wallets, 'getBalance', { userId })).availableBalance);

describe('balance alerts (LOW_BALANCE_THRESHOLD 10.00)', () => {
  let t: TestApp;
  let n = 0;
  beforeAll(async () => {
    t = await startTestApp({ LOW_BALANCE_THRESHOLD: '10.00' });
  });
  afterAll(() => t.stop());

  it('starts a new user DEPLETED without an event; then every crossing of usage and top-ups writes its events once', async () => {
    const u = await createUser(t, ++n);
    expect(await getAlert(t, u)).toEqual({ userId: u, threshold: money('10'), isDefault: true, state: S.BALANCE_ALERT_STATE_DEPLETED, availableBalance: money('0') });
    expect(await alertsOf(t, u)).toEqual([]);

    await addFunds(t, u, '25'); // 25: DEPLETED -> OK
    await addFunds(t, u, '1'); // 26
    await spend(t, u, 10); // 16
    await spend(t, u, 7); // 9: OK -> LOW
    await spend(t, u, 5); // 4: still LOW
    await addFunds(t, u, '10'); // 14: LOW -> OK
    await spend(t, u, 20); // -6: OK -> LOW and DEPLETED
    await addFunds(t, u, '3'); // -3
    await addFunds(t, u, '8'); // 5: above zero, still low: stays DEPLETED, nothing
    await spend(t, u, 5); // 0: DEPLETED already, nothing
    await addFunds(t, u, '10'); // 10: exactly the threshold, OK
    expect(await alertsOf(t, u)).toEqual([
      ['balance.recovered', 25n * U, 10n * U],
      ['balance.low', 9n * U, 10n * U],
      ['balance.recovered', 14n * U, 10n * U],
      ['balance.low', -6n * U, 10n * U],
      ['balance.depleted', -6n * U, null],
      ['balance.recovered', 10n * U, 10n * U],
    ]);
    expect(await getAlert(t, u)).toMatchObject({ state: S.BALANCE_ALERT_STATE_OK, availableBalance: money('10') });
  });

  it('writes nothing for usage that was not recorded now (a DUPLICATE) nor for an unpriced service', async () => {
    const u = await createUser(t, ++n);
    await addFunds(t, u, '11');
    await recordUsage(t.usage, [event('dup-1', u, 'api-calls', '200', new Date('2026-11-02T10:00:00Z'))]); // 9: LOW
    await recordUsage(t.usage, [event('dup-1', u, 'api-calls', '200', new Date('2026-11-02T10:00:00Z'))]); // DUPLICATE
    await recordUsage(t.usage, [event('free-1', u, 'no-such-service', '5', new Date())]); // PENDING NO_PRICE
    expect(await alertsOf(t, u)).toEqual([
      ['balance.recovered', 11n * U, 10n * U],
      ['balance.low', 9n * U, 10n * U],
    ]);
  });

  it('CreateBillingRecord lowers the available balance in its own transaction; the charge that pays it moves nothing', async () => {
    const u = await createUser(t, ++n);
    await addFunds(t, u, '20');
    const paid = await call(t.billing, 'createBillingRecord', { userId: u, amount: money('15'), description: 'setup fee', requestId: '' });
    expect(paid.billingRecord!.status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
    // Larger than the balance: the record stays unpaid, the available balance goes below zero.
    await call(t.billing, 'createBillingRecord', { userId: u, amount: money('8'), description: 'more', requestId: '' });
    expect(await available(t, u)).toBe(-3n * U);
    expect(await alertsOf(t, u)).toEqual([
      ['balance.recovered', 20n * U, 10n * U],
      ['balance.low', 5n * U, 10n * U],
      ['balance.depleted', -3n * U, null],
    ]);
    // The top-up settles the record: balance 5 + 10 - 8 = 7, available 7: still low, stays DEPLETED, nothing.
    await addFunds(t, u, '10');
    expect(await available(t, u)).toBe(7n * U);
    expect(await alertsOf(t, u)).toHaveLength(3);
    expect((await getAlert(t, u)).state).toBe(S.BALANCE_ALERT_STATE_DEPLETED);
  });

  it('a usage file crosses for each of its users in the transaction that seals the run', async () => {
    const a = await createUser(t, ++n);
    const b = await createUser(t, ++n);
    const c = await createUser(t, ++n);
    await addFunds(t, a, '12');
    await addFunds(t, b, '12');
    await addFunds(t, c, '30');
    const at = new Date(Date.now() - 60_000).toISOString();
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [
      { id: 'fa1', userId: Number(a), service: 'api-calls', quantity: 150, timestamp: at }, // a: 10.50, OK
      { id: 'fa2', userId: Number(a), service: 'api-calls', quantity: 100, timestamp: at }, // a: 9.50, LOW
      { id: 'fb1', userId: Number(b), service: 'api-calls', quantity: 1300, timestamp: at }, // b: -1, DEPLETED
      { id: 'fc1', userId: Number(c), service: 'api-calls', quantity: 100, timestamp: at }, // c: 29, OK
    ]);
    const run = (await call(t.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;
    expect(run.errorMessage).toBe('');
    expect(await alertsOf(t, a)).toEqual([
      ['balance.recovered', 12n * U, 10n * U],
      ['balance.low', 9_500_000n, 10n * U],
    ]);
    expect(await alertsOf(t, b)).toEqual([
      ['balance.recovered', 12n * U, 10n * U],
      ['balance.low', -1n * U, 10n * U],
      ['balance.depleted', -1n * U, null],
    ]);
    expect(await alertsOf(t, c)).toEqual([['balance.recovered', 30n * U, 10n * U]]);
    expect(await available(t, b)).toBe(-1n * U);
  });

  it('SetBalanceAlert evaluates a new threshold at once: raising it above the available balance writes balance.low, lowering it balance.recovered', async () => {
    const u = await createUser(t, ++n);
    await addFunds(t, u, '15'); // recovered at 15
    const raised = (await call(t.wallets, 'setBalanceAlert', { userId: u, threshold: money('20'), useDefault: false })).alert!;
    expect(raised).toEqual({ userId: u, threshold: money('20'), isDefault: false, state: S.BALANCE_ALERT_STATE_LOW, availableBalance: money('15') });
    // The same threshold again: no crossing.
    await call(t.wallets, 'setBalanceAlert', { userId: u, threshold: money('20'), useDefault: false });
    const zero = (await call(t.wallets, 'setBalanceAlert', { userId: u, threshold: money('0'), useDefault: false })).alert!;
    expect(zero).toMatchObject({ threshold: money('0'), isDefault: false, state: S.BALANCE_ALERT_STATE_OK });
    // With threshold 0 there is no low band: OK -> DEPLETED writes balance.depleted alone.
    await spend(t, u, 15);
    await addFunds(t, u, '1');
    const back = (await call(t.wallets, 'setBalanceAlert', { userId: u, useDefault: true })).alert!;
    expect(back).toEqual({ userId: u, threshold: money('10'), isDefault: true, state: S.BALANCE_ALERT_STATE_LOW, availableBalance: money('1') });
    expect(await alertsOf(t, u)).toEqual([
      ['balance.recovered', 15n * U, 10n * U],
      ['balance.low', 15n * U, 20n * U],
      ['balance.recovered', 15n * U, 0n],
      ['balance.depleted', 0n, null],
      ['balance.recovered', 1n * U, 0n],
      ['balance.low', 1n * U, 10n * U],
    ]);
  });

  it('rejects bad thresholds and unknown or deleted users with a reason', async () => {
    const u = await createUser(t, ++n);
    const set = (req: Partial<walletPb.SetBalanceAlertRequest>) => call(t.wallets, 'setBalanceAlert', { userId: u, useDefault: false, ...req });
    await expectGrpcError(set({ threshold: { currencyCode: 'USD', units: -1n, nanos: 0 } }), grpc.status.INVALID_ARGUMENT, 'NEGATIVE_THRESHOLD');
    await expectGrpcError(set({}), grpc.status.INVALID_ARGUMENT, 'MISSING_AMOUNT');
    await expectGrpcError(set({ threshold: { currencyCode: 'USD', units: 1n, nanos: 1 } }), grpc.status.INVALID_ARGUMENT, 'AMOUNT_TOO_PRECISE');
    await expectGrpcError(set({ threshold: { currencyCode: 'EUR', units: 1n, nanos: 0 } }), grpc.status.INVALID_ARGUMENT, 'CURRENCY_MISMATCH');
    await expectGrpcError(set({ userId: 0n, threshold: money('1') }), grpc.status.INVALID_ARGUMENT, 'INVALID_ID');
    await expectGrpcError(set({ userId: 999_999n, threshold: money('1') }), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.wallets, 'getBalanceAlert', { userId: 999_999n }), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');
    await call(t.users, 'deleteUser', { id: u });
    await expectGrpcError(set({ threshold: money('1') }), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');
    await expectGrpcError(call(t.wallets, 'getBalanceAlert', { userId: u }), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');
    expect(await alertsOf(t, u)).toEqual([]);
  });

  it('crosses each way exactly once under concurrent usage and top-ups of one user', async () => {
    const u = await createUser(t, ++n);
    await addFunds(t, u, '12');
    // Steps of 6.00 from 12: the available balance walks over 12 (OK), 6 (LOW), 0 (DEPLETED) and back many times,
    // in whatever order the calls commit. 40 usage batches of 6.00 (one or two events) and 40 top-ups of 6.00.
    const calls: Promise<unknown>[] = [];
    for (let i = 0; i < 40; i++) {
      calls.push(i % 2 === 0 ? spend(t, u, 6) : recordUsage(t.usage, [event(`c-${i}-a`, u, 'api-calls', '300', new Date()), event(`c-${i}-b`, u, 'api-calls', '300', new Date())]));
      calls.push(addFunds(t, u, '6'));
    }
    await Promise.all(calls);
    expect(await available(t, u)).toBe(12n * U);
    const events = await alertsOf(t, u);
    // Replay the events: each is allowed from where the last one left (never two lows or two depleted without a
    // recovered between), and its available balance is on the side of the threshold it says.
    let state: 'OK' | 'LOW' | 'DEPLETED' = 'DEPLETED';
    const T = 10n * U;
    for (const [i, [type, value, threshold]] of events.entries()) {
      const at = `event ${i}: ${type} at ${value} after ${state}`;
      if (type === 'balance.low') {
        expect([at, state, value < T, threshold]).toEqual([at, 'OK', true, T]);
        state = 'LOW';
      } else if (type === 'balance.depleted') {
        expect([at, state === 'LOW', value <= 0n]).toEqual([at, true, true]);
        state = 'DEPLETED';
      } else {
        expect([at, state !== 'OK', value >= T]).toEqual([at, true, true]);
        state = 'OK';
      }
    }
    expect(state).toBe('OK');
    expect((await getAlert(t, u)).state).toBe(S.BALANCE_ALERT_STATE_OK);
  });

  it('many concurrent usage batches of one user cross the threshold and zero once each', async () => {
    const u = await createUser(t, ++n);
    await addFunds(t, u, '12');
    // 30 batches of 1.00 at once from 12: one of them crosses 10, one crosses 0, whichever commit first.
    await Promise.all(Array.from({ length: 30 }, () => spend(t, u, 1)));
    expect(await available(t, u)).toBe(-18n * U);
    const events = await alertsOf(t, u);
    expect(events.map(([type]) => type)).toEqual(['balance.recovered', 'balance.low', 'balance.depleted']);
    expect(events[1][1]).toBe(9n * U);
    expect(events[2][1]).toBe(0n);
  });

  it('concurrent writers of the same users through every path neither deadlock nor lose a crossing', async () => {
    const users = [await createUser(t, ++n), await createUser(t, ++n), await createUser(t, ++n)];
    for (const u of users) await addFunds(t, u, '11');
    const calls: Promise<unknown>[] = [];
    for (let i = 0; i < 15; i++) {
      const [u, v] = [users[i % 3], users[(i + 1) % 3]];
      // One batch for two users, in both orders across the calls.
      calls.push(recordUsage(t.usage, [event(`m-${i}-a`, v, 'api-calls', '50', new Date()), event(`m-${i}-b`, u, 'api-calls', '50', new Date())]));
      calls.push(addFunds(t, u, '1'));
      calls.push(call(t.billing, 'createBillingRecord', { userId: v, amount: money('0.5'), description: `fee ${i}`, requestId: '' }));
      calls.push(call(t.wallets, 'setBalanceAlert', { userId: u, threshold: money(i % 2 === 0 ? '12' : '9'), useDefault: false }));
    }
    await Promise.all(calls);
    for (const u of users) {
      // Whatever the interleaving: the events replayed end in the stored state, and it fits the final balance.
      const alert = await getAlert(t, u);
      const value = micros(alert.availableBalance);
      const threshold = micros(alert.threshold);
      let replayed = 'OK';
      for (const [type] of await alertsOf(t, u)) replayed = type === 'balance.low' ? 'LOW' : type === 'balance.depleted' ? 'DEPLETED' : 'OK';
      const stored = walletPb.balanceAlertStateToJSON(alert.state).replace('BALANCE_ALERT_STATE_', '');
      const band = value <= 0n ? 'DEPLETED' : value < threshold ? 'LOW' : 'OK';
      expect([String(u), stored]).toEqual([String(u), replayed]);
      expect([String(u), stored === band || (stored === 'DEPLETED' && band === 'LOW')]).toEqual([String(u), true]);
    }
  });
});
