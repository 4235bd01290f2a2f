/**
 * Concurrency: many callers at once on the same records, the same wallet and
 * the same usage file. Each money movement happens exactly once whoever
 * triggers it, and the invariant checker passes after each scenario.
 */
import * as path from 'node:path';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { checkInvariants } from '../../src/ops/invariants';
import * as grpc from '@grpc/grpc-js';
import { call, money, reasonOf, startTestApp, type TestApp } from '../helpers/harness';
import { appendNdjson, writeNdjson, type Entry } from '../helpers/usage';
import { creditWithoutSettling } from '../helpers/ledger';

const O = billingPb.ChargeOutcome;
const R = billingPb.BillingRecordStatus;
const LONG = { deadlineMs: 120_000 };
const micros = (m?: { units: bigint; nanos: number }) => m!.units * 1_000_000n + BigInt(m!.nanos / 1000);

type Row = Record<string, unknown>;

/** A fixed permutation, so the order of the calls is not the order of the records. */
function shuffled<T>(xs: T[]): T[] {
  const out = [...xs];
  let s = 12345;
  for (let i = out.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

describe('concurrency', () => {
  let t: TestApp;
  const q = (sql: string, params: unknown[] = []) => t.app.db.fork().execute<Row[]>(sql, params);

  afterEach(async () => t?.stop());

  async function expectInvariants(): Promise<void> {
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  }

  async function newUser(n: number): Promise<bigint> {
    const { user } = await call(t.users, 'createUser', { email: `k${n}@example.com`, name: `K${n}`, requestId: '' });
    return user!.id;
  }

  it('1,000 concurrent ProcessBillingRecord calls over 100 records charge each record exactly once', async () => {
    t = await startTestApp({}, { scheduler: false });
    const ids: bigint[] = [];
    const owed = new Map<bigint, bigint>();
    for (let u = 0; u < 10; u++) {
      const userId = await newUser(u);
      for (let k = 1; k <= 10; k++) {
        const res = await call(t.billing, 'createBillingRecord', { userId, amount: money(`${k}.01`), description: `r${k}`, requestId: '' });
        expect(res.outcome).toBe(O.CHARGE_OUTCOME_RETRY_SCHEDULED); // the wallet is empty
        ids.push(res.billingRecord!.id);
        owed.set(userId, (owed.get(userId) ?? 0n) + micros(money(`${k}.01`)));
      }
    }
    for (const [userId, amount] of owed) await creditWithoutSettling(t, userId, amount); // exactly enough

    const calls = shuffled(Array.from({ length: 1000 }, (_, i) => ids[i % ids.length]));
    const results = await Promise.all(calls.map((id) => call(t.billing, 'processBillingRecord', { id }, LONG)));

    const charged = results.filter((r) => r.outcome === O.CHARGE_OUTCOME_CHARGED).map((r) => r.billingRecord!.id);
    expect(charged).toHaveLength(100);
    expect(new Set(charged).size).toBe(100);
    expect(results.filter((r) => r.outcome === O.CHARGE_OUTCOME_ALREADY_PAID)).toHaveLength(900);
    expect(results.every((r) => r.billingRecord!.status === R.BILLING_RECORD_STATUS_PAID)).toBe(true);
    const [{ n }] = await q(`select count(*) as n from wallet_transactions where type = 'DEBIT'`);
    expect(Number(n)).toBe(100);
    for (const userId of owed.keys()) {
      expect(micros((await call(t.wallets, 'getBalance', { userId })).balance)).toBe(0n);
    }
    await expectInvariants();
  });

  // Amounts are whole units: $7.00 charges (7,000,000 micros) against a $1,000.00 wallet.
  it('1,000 concurrent $7 charges against a $1,000 wallet: exactly 142 are CHARGED, the balance ends at $6, the rest retry', async () => {
    t = await startTestApp({}, { scheduler: false });
    const userId = await newUser(1);
    await call(t.wallets, 'addFunds', { userId, amount: money('1000'), requestId: 'fund' });

    const results = await Promise.all(
      Array.from({ length: 1000 }, (_, i) =>
        call(t.billing, 'createBillingRecord', { userId, amount: money('7'), description: `charge ${i}`, requestId: `c-${i}` }, LONG),
      ),
    );

    const outcomes = results.map((r) => O[r.outcome]);
    expect(outcomes.filter((o) => o === 'CHARGE_OUTCOME_CHARGED')).toHaveLength(142);
    expect(outcomes.filter((o) => o === 'CHARGE_OUTCOME_RETRY_SCHEDULED')).toHaveLength(858);
    expect(micros((await call(t.wallets, 'getBalance', { userId })).balance)).toBe(6_000_000n);
    const pending = await q(
      `select attempt_count, next_attempt_at, failure_reason from billing_records where status = 'PENDING'`,
    );
    expect(pending).toHaveLength(858);
    for (const r of pending) {
      expect({ attempts: Number(r.attempt_count), reason: r.failure_reason, scheduled: r.next_attempt_at !== null }).toEqual({
        attempts: 1,
        reason: 'INSUFFICIENT_FUNDS',
        scheduled: true,
      });
    }
    const [{ n }] = await q(`select count(*) as n from wallet_transactions where type = 'DEBIT'`);
    expect(Number(n)).toBe(142);
    await expectInvariants();
  });

  it('DeleteUser racing AddFunds on the same wallet: exactly one of the two wins each time, and no deleted user holds money', async () => {
    t = await startTestApp({}, { scheduler: false });
    const pairs = 200;
    const users: bigint[] = [];
    for (let i = 0; i < pairs; i++) users.push(await newUser(1000 + i));
    const settle = (p: Promise<unknown>) => p.then(() => 'OK', (err: grpc.ServiceError) => `${grpc.status[err.code]}/${reasonOf(err)}`);
    // Two connections, as two client services would be; each leaves 0-6 ms after the other.
    const other = new walletPb.WalletServiceClient(t.address, t.credentials, t.clientOptions);
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const results: string[][] = [];
    for (let i = 0; i < pairs; i += 20) {
      results.push(
        ...(await Promise.all(
          users.slice(i, i + 20).map((userId, k) =>
            Promise.all([
              sleep((i + k) % 7).then(() => settle(call(t.users, 'deleteUser', { id: userId }, LONG))),
              sleep(((i + k) * 3) % 7).then(() => settle(call(other, 'addFunds', { userId, amount: money('3.17'), requestId: `race-${i + k}` }, LONG))),
            ]),
          ),
        )),
      );
    }
    other.close();
    const seen = new Map<string, number>();
    for (const [del, add] of results) seen.set(`${del} + ${add}`, (seen.get(`${del} + ${add}`) ?? 0) + 1);
    // Whichever commits first wins: the delete (then the credit finds no user) or the credit (then the wallet is not empty).
    for (const outcome of seen.keys()) {
      expect(['OK + NOT_FOUND/USER_NOT_FOUND', 'FAILED_PRECONDITION/BALANCE_NOT_ZERO + OK']).toContain(outcome);
    }
    const held = await q(
      `select count(*) as n from wallets w join users u on u.id = w.user_id where u.deleted_at is not null and w.balance <> 0`,
    );
    expect(Number(held[0].n)).toBe(0);
    await expectInvariants();
  });

  it('ProcessLogs over RPC at the same time as the cron job bills every entry exactly once', async () => {
    t = await startTestApp({}, { scheduler: false });
    const file = path.join(t.dir, 'usage-logs.json');
    const users: number[] = [];
    for (let u = 0; u < 40; u++) {
      const userId = await newUser(u);
      await call(t.wallets, 'addFunds', { userId, amount: money('100000'), requestId: '' });
      users.push(Number(userId));
    }
    const services = ['api-calls', 'storage', 'bandwidth', 'compute'];
    const expected = new Map<string, bigint>();
    const batch = (from: number, n: number): Entry[] =>
      Array.from({ length: n }, (_, i) => {
        const k = from + i;
        const e: Entry = { id: `e${k}`, userId: users[k % users.length], service: services[k % 4], quantity: (k % 13) + 1, timestamp: '2025-03-01T12:00:00Z' };
        const key = `${e.userId}/${e.service}`;
        expected.set(key, (expected.get(key) ?? 0n) + BigInt(e.quantity) * 1_000_000n);
        return e;
      });

    /** The cron tick, RPC ProcessLogs and RPC ProcessAll, all at once. */
    const together = () =>
      Promise.all([
        t.app.services.jobs.run('PROCESS_ALL', 'cron'),
        ...Array.from({ length: 4 }, () => call(t.jobs, 'processLogs', {}, LONG).then((r) => r.jobRun!)),
        t.app.services.jobs.run('PROCESS_ALL', 'cron'),
        call(t.jobs, 'processAll', {}, LONG).then((r) => r.jobRun!),
      ]);

    const billedPerUserService = async () => {
      const rows = await q(
        `select r.user_id, li.service, cast(li.quantity as text) as quantity
         from line_items li join billing_records r on r.id = li.billing_record_id`,
      );
      const out = new Map<string, bigint>();
      for (const r of rows) {
        const key = `${Number(r.user_id)}/${r.service}`;
        out.set(key, (out.get(key) ?? 0n) + BigInt(r.quantity as string));
      }
      return out;
    };

    writeNdjson(file, batch(0, 4000));
    await together();
    let [{ n: billed }] = await q(`select count(*) as n from usage_logs where status = 'BILLED'`);
    expect(Number(billed)).toBe(4000);
    const perUser = await q(`select user_id, count(*) as n from billing_records where kind = 'USAGE' group by user_id`);
    expect(perUser.map((r) => Number(r.n))).toEqual(users.map(() => 1));
    expect(await billedPerUserService()).toEqual(expected);
    await expectInvariants();

    appendNdjson(file, batch(4000, 1000));
    await together();
    [{ n: billed }] = await q(`select count(*) as n from usage_logs where status = 'BILLED'`);
    expect(Number(billed)).toBe(5000);
    const [{ n: records }] = await q(`select count(*) as n from billing_records where kind = 'USAGE'`);
    expect(Number(records)).toBe(80); // one more per user: every user has new entries
    expect(await billedPerUserService()).toEqual(expected);
    const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 500, pageToken: '' });
    expect(jobRuns.filter((r) => r.status !== jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED)).toEqual([]);
    await expectInvariants();
  });
});
