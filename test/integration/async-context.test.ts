/**
 * The service never enters an AsyncLocalStorage. MikroORM's em.transactional
 * and every flush of its unit of work run inside one, and on Node 20 the first
 * AsyncLocalStorage.run installs promise hooks for the rest of the process:
 * from then on every promise of every call pays for them (GetBalance answered
 * 13% fewer calls/s). So Database.transaction begins and commits on the
 * connection itself, and the repositories write with SQL or the ORM's native
 * insert and update. This test runs every kind of write the service makes
 * (the user lifecycle, credits, usage, billing, the jobs, and the start-up
 * sweeps) and fails if any of them entered an AsyncLocalStorage.
 */
import * as path from 'node:path';
import { AsyncLocalStorage } from 'node:async_hooks';
import * as grpc from '@grpc/grpc-js';
import { call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { event, recordUsage } from '../helpers/usage-api';
import { entry, writeJsonArray } from '../helpers/usage';

/** Where each AsyncLocalStorage.run / enterWith came from (a few frames of its stack). */
const entered: string[] = [];
const patched: { name: 'run' | 'enterWith'; original: (...args: never[]) => unknown }[] = [];

let t: TestApp;

beforeAll(async () => {
  for (const name of ['run', 'enterWith'] as const) {
    const original = AsyncLocalStorage.prototype[name] as (...args: never[]) => unknown;
    patched.push({ name, original });
    (AsyncLocalStorage.prototype as unknown as Record<string, unknown>)[name] = function (this: unknown, ...args: never[]) {
      entered.push(`${name}\n${new Error().stack?.split('\n').slice(2, 9).join('\n')}`);
      return original.apply(this, args);
    };
  }
  t = await startTestApp();
});

afterAll(async () => {
  await t?.stop();
  for (const { name, original } of patched) (AsyncLocalStorage.prototype as unknown as Record<string, unknown>)[name] = original;
});

it('no write path enters an AsyncLocalStorage (which would slow every promise on Node 20)', async () => {
  // The start-up sweeps (interrupted job runs, the event retention) ran in startTestApp.
  const { user } = await call(t.users, 'createUser', { email: 'ada@example.com', name: 'Ada', requestId: 'c1' });
  const id = user!.id;
  await call(t.users, 'createUser', { email: 'ada@example.com', name: 'Ada', requestId: 'c1' }); // replayed
  await expectGrpcError(call(t.users, 'createUser', { email: 'ada@example.com', name: 'Other', requestId: '' }), grpc.status.ALREADY_EXISTS, 'EMAIL_TAKEN');
  await call(t.users, 'updateUser', { id, name: 'Ada L.', email: 'ada.l@example.com' });
  await call(t.users, 'suspendUser', { id, reason: 'checking' });
  await call(t.users, 'activateUser', { id });
  await call(t.wallets, 'addFunds', { userId: id, amount: money('2'), requestId: 'f1' });
  await call(t.wallets, 'addFunds', { userId: id, amount: money('2'), requestId: 'f1' }); // replayed
  await call(t.wallets, 'setBalanceAlert', { userId: id, threshold: money('1'), useDefault: false });
  await call(t.wallets, 'getBalance', { userId: id });
  await recordUsage(t.usage, [event('e1', id, 'api-calls', '10')]);
  const { billingRecord } = await call(t.billing, 'createBillingRecord', { userId: id, amount: money('5'), description: 'too much', requestId: 'b1' });
  await call(t.billing, 'processBillingRecord', { id: billingRecord!.id }); // fails again: a retry is scheduled
  await call(t.wallets, 'addFunds', { userId: id, amount: money('10'), requestId: 'f2' }); // settles it
  writeJsonArray(path.join(t.dir, 'usage-logs.json'), [entry(Number(id), 'storage', 3), entry(Number(id), 'compute', 1)]);
  await call(t.jobs, 'processLogs', {});
  await call(t.jobs, 'processRetries', {});
  const { user: other } = await call(t.users, 'createUser', { email: 'bob@example.com', name: 'Bob', requestId: '' });
  await call(t.users, 'deleteUser', { id: other!.id });

  expect(entered).toEqual([]);
});
