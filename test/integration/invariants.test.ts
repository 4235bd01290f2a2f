/**
 * The invariant checker (src/ops/invariants.ts) passes on a busy, healthy
 * database and catches each rule broken by hand: every corruption runs in a
 * transaction that is rolled back, so each starts from the same healthy data,
 * and each must trip exactly the rules it breaks. The CLI is run as operators
 * run it (dist/, built by `npm test`): exit 0, 1 or 2, and never a migration
 * applied to a database it was pointed at.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { EntityManager } from '@mikro-orm/knex';
import pino from 'pino';
import { openDatabase } from '../../src/db/database';
import { checkInvariants, INVARIANT_RULES, type InvariantReport, type InvariantRule } from '../../src/ops/invariants';
import { createTestDatabase, onPostgres } from '../helpers/database';
import { FakeClock } from '../helpers/fake-clock';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { appendNdjson, entry, writeNdjson } from '../helpers/usage';

const CLI = path.resolve(__dirname, '../../dist/src/ops/check-invariants.js');

type Row = Record<string, unknown>;

class Rollback extends Error {}

function runCli(env: Record<string, string>, args: string[] = []): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [CLI, ...args], { env: { PATH: process.env.PATH, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

const rulesOf = (report: InvariantReport): InvariantRule[] => [...new Set(report.violations.map((v) => v.rule))].sort();

describe('the invariant checker', () => {
  let t: TestApp;
  let clock: FakeClock;

  /** Reads rows through a fresh fork of the app's entity manager. */
  const q = (sql: string, params: unknown[] = []) => t.app.db.fork().execute<Row[]>(sql, params);

  beforeAll(async () => {
    clock = new FakeClock();
    t = await startTestApp({ MAX_RETRIES: '2', RETRY_BASE_DELAY_MS: '1000' }, { clock, scheduler: false });
    const file = path.join(t.dir, 'usage-logs.json');
    const ids: bigint[] = [];
    for (let i = 1; i <= 12; i++) {
      const { user } = await call(t.users, 'createUser', { email: `busy${i}@example.com`, name: `Busy ${i}`, requestId: `u-${i}` });
      ids.push(user!.id);
      // Users 10-12 start with nothing, 7-9 with too little for their usage.
      if (i <= 9) await call(t.wallets, 'addFunds', { userId: user!.id, amount: money(i <= 6 ? '500' : '0.25'), requestId: `f-${i}` });
    }
    for (const [n, id] of ids.entries()) {
      await call(t.billing, 'createBillingRecord', { userId: id, amount: money('1.5'), description: `fee ${n}`, requestId: `r-${n}` });
    }
    const usage = [];
    for (let k = 0; k < 300; k++) {
      const userId = Number(ids[k % ids.length]);
      usage.push(entry(userId, ['api-calls', 'storage', 'bandwidth', 'compute'][k % 4], (k % 7) + 0.5, { id: `e-${k}` }));
    }
    usage.push(entry(999, 'api-calls', 5)); // unknown user: stays PENDING
    usage.push(entry(Number(ids[0]), 'gpu', 5)); // no price: stays PENDING
    writeNdjson(file, [...usage, '{"userId": 1, "service": ', '{"userId": -4, "service": "storage", "quantity": 1, "timestamp": "2024-01-15T10:00:00Z"}']);
    await call(t.jobs, 'processLogs', {});
    // Retries run out for the short users: FAILED and suspended.
    for (const delay of [1000, 2000]) {
      clock.advance(delay);
      await call(t.jobs, 'processRetries', {});
    }
    // A top-up settles one suspended user's failed records; another gets a partial top-up.
    await call(t.wallets, 'addFunds', { userId: ids[7], amount: money('100'), requestId: 'settle-8' });
    await call(t.wallets, 'addFunds', { userId: ids[10], amount: money('1'), requestId: 'partial-11' });
    appendNdjson(file, [entry(Number(ids[1]), 'storage', 3, { id: 'late-1' }), entry(Number(ids[2]), 'compute', '0.000001', { id: 'late-2' })]);
    await call(t.jobs, 'processLogs', {});
    // A deleted user (nothing owed, nothing left) keeps its ledger.
    const { user: gone } = await call(t.users, 'createUser', { email: 'gone@example.com', name: 'Gone', requestId: '' });
    await call(t.wallets, 'addFunds', { userId: gone!.id, amount: money('2'), requestId: '' });
    await call(t.billing, 'createBillingRecord', { userId: gone!.id, amount: money('2'), description: 'final', requestId: '' });
    await call(t.users, 'deleteUser', { id: gone!.id });
  });

  afterAll(async () => t?.stop());

  /**
   * Applies a corruption inside a transaction, checks the database as the
   * transaction sees it, and rolls everything back.
   */
  async function corrupted(corrupt: (tx: EntityManager) => Promise<void>): Promise<InvariantReport> {
    let report: InvariantReport | undefined;
    const em = t.app.db.fork();
    try {
      await em.transactional(async (tx) => {
        await corrupt(tx);
        report = await checkInvariants(t.app.db, { within: tx });
        throw new Rollback();
      });
    } catch (err) {
      if (!(err instanceof Rollback)) throw err;
    } finally {
      // A connection flag, not part of the transaction (SQLite only).
      if (!onPostgres) await em.execute('pragma ignore_check_constraints = off');
    }
    return report!;
  }

  /** Lets a corruption write values the schema's CHECK constraints refuse. */
  async function withoutChecks(tx: EntityManager): Promise<void> {
    if (onPostgres) {
      await tx.execute('alter table wallets drop constraint wallets_balance_check');
      await tx.execute('alter table wallet_transactions drop constraint wallet_transactions_balance_after_check');
    } else {
      await tx.execute('pragma ignore_check_constraints = on');
    }
  }

  /**
   * Moves the retention mark past instant 0, so rows a corruption writes
   * stamped 0 count as older than the retention (their events may be gone)
   * and only the rule under test sees them; the fixture's rows (2026) are
   * still expected to have their events.
   */
  async function stampedBeforeRetention(tx: EntityManager): Promise<void> {
    await tx.execute('update event_retention set pruned_before = 1 where id = 1');
  }

  const one = async (tx: EntityManager, sql: string, params: unknown[] = []): Promise<Row> => {
    const rows = await tx.execute<Row[]>(sql, params);
    expect(rows.length).toBeGreaterThan(0); // the healthy data has what the corruption needs
    return rows[0];
  };

  /** A PAID, debited record of a user who could pay it again. */
  const paidRecord = (tx: EntityManager) =>
    one(
      tx,
      `select r.id, r.user_id, cast(r.amount as text) as amount, cast(w.balance as text) as balance
       from billing_records r join wallets w on w.user_id = r.user_id
       where r.status = 'PAID' and r.amount > 0 and w.balance >= r.amount order by r.id`,
    );

  it('passes on a busy healthy database and counts what it holds', async () => {
    const report = await checkInvariants(t.app.db);
    expect(report.violations).toEqual([]);
    expect(report.ok).toBe(true);
    const c = report.counts;
    // The fixture reaches every state the rules talk about.
    expect(c.billingRecords.PAID).toBeGreaterThan(0);
    expect(c.billingRecords.PENDING + c.billingRecords.FAILED).toBeGreaterThan(0);
    expect(c.usageLogs).toEqual({ BILLED: 302, PENDING: 2, REJECTED: 2 });
    expect(c.deletedUsers).toBe(1);
    expect(c.totalBalance).toBe(c.creditTotal - c.debitTotal);
    const [{ n }] = await q(`select count(*) as n from wallet_transactions`);
    expect(c.credits + c.debits).toBe(Number(n));
  });

  it('reports a wallet whose balance differs from its ledger', async () => {
    const report = await corrupted(async (tx) => {
      const { user_id } = await one(tx, `select user_id from wallets where balance > 0 order by user_id`);
      await tx.execute('update wallets set balance = balance + 1 where user_id = ?', [user_id]);
    });
    expect(rulesOf(report)).toEqual(['balance_matches_ledger']);
    expect(report.ok).toBe(false);
  });

  it('reports ledger rows of a user that has no wallet', async () => {
    const report = await corrupted(async (tx) => {
      const { user_id } = await one(tx, `select user_id from wallets where balance = 0 and exists (select 1 from wallet_transactions t where t.user_id = wallets.user_id)`);
      await tx.execute('delete from wallets where user_id = ?', [user_id]);
    });
    expect(rulesOf(report)).toEqual(['balance_matches_ledger']);
  });

  it('reports a balance and a ledger row below zero, even when ledger and chain agree', async () => {
    const report = await corrupted(async (tx) => {
      await stampedBeforeRetention(tx);
      await withoutChecks(tx);
      const { user_id, balance } = await one(tx, `select user_id, cast(balance as text) as balance from wallets where balance > 0 order by user_id`);
      const amount = (BigInt(balance as string) + 5_000_000n).toString();
      const [{ id }] = await tx.execute<Row[]>(
        `insert into billing_records (user_id, kind, amount, status, description, created_at, updated_at, paid_at)
         values (?, 'MANUAL', cast(? as bigint), 'PAID', 'overdraft', 0, 0, 0) returning id`,
        [user_id, amount],
      );
      await tx.execute(
        `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, created_at)
         values (?, 'DEBIT', cast(? as bigint), cast(? as bigint), ?, 0)`,
        [user_id, amount, '-5000000', id],
      );
      await tx.execute(`update wallets set balance = cast(? as bigint) where user_id = ?`, ['-5000000', user_id]);
    });
    expect(rulesOf(report)).toEqual(['no_negative_balance']);
    expect(report.violations).toHaveLength(2); // the wallet and the ledger row
  });

  it('reports a ledger whose rows do not follow from each other', async () => {
    const report = await corrupted(async (tx) => {
      const { id } = await one(
        tx,
        `select min(t.id) as id from wallet_transactions t
         where t.user_id = (select user_id from wallet_transactions group by user_id having count(*) >= 3 order by user_id limit 1)`,
      );
      await tx.execute('update wallet_transactions set balance_after = balance_after + 1 where id = ?', [id]);
    });
    expect(rulesOf(report)).toEqual(['ledger_chain']);
    expect(report.violations).toHaveLength(2); // the row itself and the one after it
  });

  it('reports a billing record debited twice', async () => {
    const report = await corrupted(async (tx) => {
      await stampedBeforeRetention(tx);
      await tx.execute('drop index wallet_transactions_one_debit_per_record');
      const r = await paidRecord(tx);
      const after = (BigInt(r.balance as string) - BigInt(r.amount as string)).toString();
      await tx.execute(
        `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, created_at)
         values (?, 'DEBIT', cast(? as bigint), cast(? as bigint), ?, 0)`,
        [r.user_id, r.amount, after, r.id],
      );
      await tx.execute('update wallets set balance = cast(? as bigint) where user_id = ?', [after, r.user_id]);
    });
    // The ledger itself stays consistent: only the record rules see the second debit.
    expect(rulesOf(report)).toEqual(['one_debit_per_record', 'paid_record_debited_once']);
  });

  it('reports a PAID record that was never debited', async () => {
    const report = await corrupted(async (tx) => {
      await stampedBeforeRetention(tx);
      const { user_id } = await one(tx, `select user_id from wallets order by user_id`);
      await tx.execute(
        `insert into billing_records (user_id, kind, amount, status, description, created_at, updated_at, paid_at)
         values (?, 'MANUAL', 5000000, 'PAID', 'free lunch', 0, 0, 0)`,
        [user_id],
      );
    });
    expect(rulesOf(report)).toEqual(['paid_record_debited_once']);
  });

  it('reports a debit that belongs to a record that is not PAID', async () => {
    const report = await corrupted(async (tx) => {
      const { id } = await paidRecord(tx);
      await tx.execute(`update billing_records set status = 'FAILED', paid_at = null where id = ?`, [id]);
    });
    // Its events say PAID, and a FAILED record without its billing_record.failed event breaks the event rules too.
    expect(rulesOf(report)).toEqual(['billing_record_events', 'debit_for_paid_record']);
  });

  it('reports a usage entry linked to a record while not BILLED', async () => {
    const report = await corrupted(async (tx) => {
      const { id } = await one(tx, `select id from usage_logs where status = 'REJECTED' order by id`);
      const { id: recordId } = await one(tx, `select id from billing_records where kind = 'USAGE' order by id`);
      await tx.execute('update usage_logs set billing_record_id = ? where id = ?', [recordId, id]);
    });
    expect(rulesOf(report)).toEqual(['usage_linked_to_record']);
  });

  it("reports a BILLED entry moved to another user's record", async () => {
    const report = await corrupted(async (tx) => {
      const e = await one(tx, `select id, user_id from usage_logs where status = 'BILLED' order by id`);
      const { id: other } = await one(tx, `select id from billing_records where kind = 'USAGE' and user_id <> ? order by id`, [e.user_id]);
      await tx.execute('update usage_logs set billing_record_id = ? where id = ?', [other, e.id]);
    });
    // The quantities no longer match the line items on either record either.
    expect(rulesOf(report)).toEqual(['usage_linked_to_record', 'usage_matches_line_items']);
  });

  it('reports a usage record whose amount is not the sum of its line items', async () => {
    const report = await corrupted(async (tx) => {
      const { id } = await one(tx, `select min(id) as id from line_items`);
      await tx.execute('update line_items set amount = amount + 1 where id = ?', [id]);
    });
    expect(rulesOf(report)).toEqual(['usage_record_total']);
  });

  it('reports a billed quantity that its line item does not bill', async () => {
    const report = await corrupted(async (tx) => {
      const { id } = await one(tx, `select id from usage_logs where status = 'BILLED' order by id`);
      await tx.execute('update usage_logs set quantity = quantity + 1 where id = ?', [id]);
    });
    expect(rulesOf(report)).toEqual(['usage_matches_line_items']);
  });

  it('keeps working when the usage it sums passes 2^63: it reports the broken rule instead of failing', async () => {
    let exact = 0n;
    const report = await corrupted(async (tx) => {
      const pair = await one(
        tx,
        `select billing_record_id, service from usage_logs where status = 'BILLED'
         group by billing_record_id, service having count(*) >= 2 order by billing_record_id`,
      );
      const linked = await tx.execute<Row[]>(
        `select cast(quantity as text) as q from usage_logs where billing_record_id = ? and service = ? and status = 'BILLED' order by id`,
        [pair.billing_record_id, pair.service],
      );
      exact = 18_000_000_000_000_000_000n + linked.slice(2).reduce((sum, r) => sum + BigInt(r.q as string), 0n);
      // Two entries of 9 x 10^18 each: their sum does not fit a 64-bit integer (SQLite's sum() refuses it).
      await tx.execute(
        `update usage_logs set quantity = 9000000000000000000 where id in (
           select id from usage_logs where billing_record_id = ? and service = ? and status = 'BILLED' order by id limit 2)`,
        [pair.billing_record_id, pair.service],
      );
    });
    expect(rulesOf(report)).toEqual(['usage_matches_line_items']);
    expect(report.violations[0].detail).toContain(`add up to ${exact}`);
  });

  it('keeps counting totals past 2^63 exactly', async () => {
    const report = await corrupted(async (tx) => {
      await stampedBeforeRetention(tx);
      // Balances that sum past 2^63 - 1 across wallets (each one within range and matching a ledger row).
      for (const { user_id: id } of await tx.execute<Row[]>(`select user_id from wallets w join users u on u.id = w.user_id where u.deleted_at is null order by user_id limit 2`)) {
        const [w] = await tx.execute<Row[]>('select cast(balance as text) as b from wallets where user_id = ?', [id]);
        const add = 5000000000000000000n;
        await tx.execute('update wallets set balance = balance + cast(? as bigint) where user_id = ?', [add.toString(), id]);
        await tx.execute(
          `insert into wallet_transactions (user_id, type, amount, balance_after, created_at) values (?, 'CREDIT', cast(? as bigint), cast(? as bigint), 0)`,
          [id, add.toString(), (BigInt(w.b as string) + add).toString()],
        );
      }
    });
    expect(report.violations).toEqual([]);
    expect(report.counts.totalBalance).toBe(report.counts.creditTotal - report.counts.debitTotal);
    expect(report.counts.totalBalance > 10_000_000_000_000_000_000n - 1n).toBe(true);
  });

  /** The deleted user of the fixture: nothing owed, nothing left. */
  const deletedUser = (tx: EntityManager) => one(tx, `select id from users where deleted_at is not null order by id`);

  it("reports money in a deleted user's wallet", async () => {
    const report = await corrupted(async (tx) => {
      await stampedBeforeRetention(tx);
      const { id } = await deletedUser(tx);
      // A credit as if it had raced the delete: balance and ledger agree, but nobody can see or spend it.
      await tx.execute('update wallets set balance = balance + 5 where user_id = ?', [id]);
      const [w] = await tx.execute<Row[]>('select cast(balance as text) as b from wallets where user_id = ?', [id]);
      await tx.execute(
        `insert into wallet_transactions (user_id, type, amount, balance_after, created_at) values (?, 'CREDIT', 5, cast(? as bigint), 0)`,
        [id, w.b],
      );
    });
    expect(rulesOf(report)).toEqual(['deleted_user_settled']);
  });

  it('reports a deleted user whose wallet is still open, and an unpaid record of a deleted user', async () => {
    const open = await corrupted(async (tx) => {
      const { id } = await deletedUser(tx);
      await tx.execute('update wallets set closed_at = null where user_id = ?', [id]);
    });
    expect(rulesOf(open)).toEqual(['deleted_user_settled']);
    const unpaid = await corrupted(async (tx) => {
      await stampedBeforeRetention(tx);
      const { id } = await deletedUser(tx);
      await tx.execute(
        `insert into billing_records (user_id, kind, amount, status, description, attempt_count, created_at, updated_at)
         values (?, 'MANUAL', 1000000, 'PENDING', 'late', 0, 0, 0)`,
        [id],
      );
    });
    expect(rulesOf(unpaid)).toEqual(['deleted_user_settled']);
  });

  it('accepts a run caught in the middle of storing its rows (a staging record, BILLED rows pointing at it)', async () => {
    const report = await corrupted(async (tx) => {
      const { id: userId } = await one(tx, `select id from users where deleted_at is null order by id`);
      const [{ run }] = await tx.execute<Row[]>(`select max(id) + 1 as run from job_runs`);
      await tx.execute(`insert into job_runs (id, kind, status, trigger, started_at) values (?, 'PROCESS_LOGS', 'RUNNING', 'rpc', 0)`, [run]);
      await tx.execute(`insert into usage_runs (job_run_id, first_usage_id, state) values (?, 1000000, 'STAGING')`, [run]);
      const [{ id: recordId }] = await tx.execute<Row[]>(
        `insert into billing_records (user_id, kind, amount, status, description, attempt_count, job_run_id, created_at, updated_at, staging)
         values (?, 'USAGE', 0, 'PENDING', '', 0, ?, 0, 0, ?) returning id`,
        [userId, run, true],
      );
      await tx.execute(
        `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, billing_record_id, job_run_id, ingested_at)
         values ('e:mid-run-1', ?, 'api-calls', 1000000, 0, 'BILLED', '', ?, ?, 0), ('e:mid-run-2', ?, 'storage', 2000000, 0, 'BILLED', '', ?, ?, 0)`,
        [userId, recordId, run, userId, recordId, run],
      );
    });
    expect(report.violations).toEqual([]);
  });

  /** A run caught after its file: a staging record prepared with its lines (earlier PENDING usage it bills not linked yet). */
  async function preparedRun(tx: EntityManager, amount: number, state = 'STAGING'): Promise<void> {
    const { id: userId } = await one(tx, `select id from users where deleted_at is null order by id`);
    const [{ run }] = await tx.execute<Row[]>(`select max(id) + 1 as run from job_runs`);
    await tx.execute(`insert into job_runs (id, kind, status, trigger, started_at) values (?, 'PROCESS_LOGS', 'RUNNING', 'rpc', 0)`, [run]);
    await tx.execute(`insert into usage_runs (job_run_id, first_usage_id, state) values (?, 1000000, ?)`, [run, state]);
    const [{ id: recordId }] = await tx.execute<Row[]>(
      `insert into billing_records (user_id, kind, amount, status, description, attempt_count, job_run_id, created_at, updated_at, staging)
       values (?, 'USAGE', ?, 'PENDING', 'Usage: 3 api-calls', 0, ?, 0, 0, ?) returning id`,
      [userId, amount, run, true],
    );
    await tx.execute(
      `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, billing_record_id, job_run_id, ingested_at)
       values ('e:prepared-1', ?, 'api-calls', 1000000, 0, 'BILLED', '', ?, ?, 0)`,
      [userId, recordId, run],
    );
    // The line counts 3 calls: the run's 1 and 2 PENDING from an earlier run, linked when the run seals.
    await tx.execute(`insert into line_items (billing_record_id, service, quantity, unit_price, amount) values (?, 'api-calls', 3000000, 10000, 30000)`, [
      recordId,
    ]);
  }

  it('accepts a run caught preparing its records (a staging record with its line items, amount 0)', async () => {
    const report = await corrupted((tx) => preparedRun(tx, 0));
    expect(report.violations).toEqual([]);
  });

  it('accepts a run caught sealing its records (a staging record of a SEALING run)', async () => {
    const report = await corrupted((tx) => preparedRun(tx, 0, 'SEALING'));
    expect(report.violations).toEqual([]);
  });

  it('reports a staging record that owes something before its run sealed it', async () => {
    const report = await corrupted((tx) => preparedRun(tx, 30000));
    expect(rulesOf(report)).toEqual(['staging_record_of_open_run']);
  });

  it('reports a staging record whose run sealed or was rolled back, or that was charged', async () => {
    const sealed = await corrupted(async (tx) => {
      const { id } = await one(tx, `select id from billing_records where kind = 'USAGE' order by id`);
      await tx.execute('update billing_records set staging = ? where id = ?', [true, id]);
    });
    // A staging record is invisible, so its billing_record.created event names a record nobody can see.
    expect(rulesOf(sealed)).toEqual(['billing_record_events', 'staging_record_of_open_run']);
  });

  it('reports pending totals that differ from the PENDING usage they stand for', async () => {
    const report = await corrupted(async (tx) => {
      const { id } = await one(tx, `select id from users where deleted_at is null order by id`);
      await tx.execute(
        `insert into usage_pending_totals (user_id, service, quantity_hi, quantity_lo, entries) values (?, 'api-calls', 0, 1, 1)
         on conflict (user_id, service) do update set quantity_lo = usage_pending_totals.quantity_lo + 1`,
        [id],
      );
    });
    expect(rulesOf(report)).toEqual(['pending_totals_match']);
  });

  /** The id of the first event of `type` (the fixture has every type this file corrupts). */
  const firstEvent = async (tx: EntityManager, type: string, extra = ''): Promise<Row> =>
    one(tx, `select e.id, e.user_id, e.ref_id from events e where e.type = ? ${extra} order by e.id`, [type]);
  const copyEvent = async (tx: EntityManager, id: unknown): Promise<void> => {
    await tx.execute(`insert into events (type, user_id, ref_id, payload, created_at) select type, user_id, ref_id, payload, created_at from events where id = ?`, [id]);
  };

  it('reports a ledger row without its event, an event without its row, and a row with two events', async () => {
    const lost = await corrupted(async (tx) => {
      const { id } = await firstEvent(tx, 'wallet.credited');
      await tx.execute('delete from events where id = ?', [id]);
    });
    expect(rulesOf(lost)).toEqual(['ledger_row_has_event']);
    expect(lost.violations).toHaveLength(1);
    const moved = await corrupted(async (tx) => {
      const { id } = await firstEvent(tx, 'wallet.debited');
      await tx.execute('update events set ref_id = ref_id + 1000000 where id = ?', [id]);
    });
    expect(rulesOf(moved)).toEqual(['ledger_row_has_event']);
    expect(moved.violations).toHaveLength(2); // the row that lost it, and the event naming no row
    const twice = await corrupted(async (tx) => copyEvent(tx, (await firstEvent(tx, 'wallet.debited')).id));
    expect(rulesOf(twice)).toEqual(['ledger_row_has_event']);
    const wrongType = await corrupted(async (tx) => {
      const { id } = await firstEvent(tx, 'wallet.credited');
      await tx.execute(`update events set type = 'wallet.debited' where id = ?`, [id]);
    });
    expect(rulesOf(wrongType)).toEqual(['ledger_row_has_event']);
  });

  it('reports a billing record without its created, paid or failed event, and a paid event twice or for an unpaid record', async () => {
    for (const [type, where] of [
      ['billing_record.created', ''],
      ['billing_record.paid', ''],
      ['billing_record.failed', `and exists (select 1 from billing_records r where r.id = e.ref_id and r.status = 'FAILED')`],
    ] as const) {
      const report = await corrupted(async (tx) => {
        const { ref_id } = await firstEvent(tx, type, where);
        await tx.execute('delete from events where type = ? and ref_id = ?', [type, ref_id]);
      });
      expect({ type, rules: rulesOf(report) }).toEqual({ type, rules: ['billing_record_events'] });
    }
    const twice = await corrupted(async (tx) => copyEvent(tx, (await firstEvent(tx, 'billing_record.paid')).id));
    expect(rulesOf(twice)).toEqual(['billing_record_events']);
    const unpaid = await corrupted(async (tx) => {
      const { id } = await firstEvent(tx, 'billing_record.created', `and exists (select 1 from billing_records r where r.id = e.ref_id and r.status <> 'PAID')`);
      await copyEvent(tx, id);
      await tx.execute(`update events set type = 'billing_record.paid' where id = (select max(id) from events)`);
    });
    expect(rulesOf(unpaid)).toEqual(['billing_record_events']);
  });

  it('reports a user without user.created, a deleted user without user.deleted, and user.deleted for a live user', async () => {
    const created = await corrupted(async (tx) => {
      const { user_id } = await firstEvent(tx, 'user.created');
      await tx.execute(`delete from events where type = 'user.created' and user_id = ?`, [user_id]);
    });
    expect(rulesOf(created)).toEqual(['user_events']);
    const deleted = await corrupted(async (tx) => {
      await tx.execute(`delete from events where type = 'user.deleted'`);
    });
    expect(rulesOf(deleted)).toEqual(['user_events']);
    const live = await corrupted(async (tx) => {
      const { id } = await firstEvent(tx, 'user.created', `and exists (select 1 from users u where u.id = e.user_id and u.deleted_at is null)`);
      await copyEvent(tx, id);
      await tx.execute(`update events set type = 'user.deleted', payload = '{}' where id = (select max(id) from events)`);
    });
    expect(rulesOf(live)).toEqual(['user_events']);
  });

  it('reports an ended job run without job_run.finished, with the wrong status, or twice, and an event for a running run', async () => {
    const lost = await corrupted(async (tx) => {
      const { id } = await firstEvent(tx, 'job_run.finished');
      await tx.execute('delete from events where id = ?', [id]);
    });
    expect(rulesOf(lost)).toEqual(['job_run_finished_event']);
    const status = await corrupted(async (tx) => {
      const { ref_id } = await firstEvent(tx, 'job_run.finished');
      await tx.execute(`update job_runs set status = case when status = 'FAILED' then 'SUCCEEDED' else 'FAILED' end where id = ?`, [ref_id]);
    });
    expect(rulesOf(status)).toEqual(['job_run_finished_event']);
    const twice = await corrupted(async (tx) => copyEvent(tx, (await firstEvent(tx, 'job_run.finished')).id));
    expect(rulesOf(twice)).toEqual(['job_run_finished_event']);
    const running = await corrupted(async (tx) => {
      const { ref_id } = await firstEvent(tx, 'job_run.finished');
      await tx.execute(`update job_runs set status = 'RUNNING', ended_at = null where id = ?`, [ref_id]);
    });
    expect(rulesOf(running)).toEqual(['job_run_finished_event']);
  });

  it('expects no events for changes older than the retention mark, and no events left below the id it deleted through', async () => {
    // The retention deleted everything: no change is expected to have its event any more.
    const pruned = await corrupted(async (tx) => {
      await tx.execute('delete from events');
      await tx.execute(`update event_retention set pruned_through = 1000000000, pruned_before = ? where id = 1`, [Date.parse('2100-01-01')]);
    });
    expect(pruned.violations).toEqual([]);
    // It says it deleted through the last id, but they are all still there.
    const left = await corrupted(async (tx) => {
      await tx.execute(`update event_retention set pruned_through = (select max(id) from events) where id = 1`);
    });
    expect(rulesOf(left)).toEqual(['events_after_retention']);
  });

  it('has a corruption above for every rule', () => {
    // Keeps this file honest when a rule is added.
    expect(Object.keys(INVARIANT_RULES).sort()).toEqual(
      [
        'balance_matches_ledger',
        'billing_record_events',
        'debit_for_paid_record',
        'events_after_retention',
        'job_run_finished_event',
        'ledger_row_has_event',
        'user_events',
        'deleted_user_settled',
        'ledger_chain',
        'no_negative_balance',
        'one_debit_per_record',
        'paid_record_debited_once',
        'pending_totals_match',
        'staging_record_of_open_run',
        'usage_linked_to_record',
        'usage_matches_line_items',
        'usage_record_total',
      ].sort(),
    );
  });

  it('the rolled-back corruptions left the database healthy', async () => {
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  describe('npm run check-invariants', () => {
    const dbEnv = (): Record<string, string> => {
      const db = t.app.config.database;
      return db.kind === 'sqlite' ? { DB_PATH: db.path } : { DATABASE_URL: db.url };
    };

    it('exits 0 on the healthy database and 1 with the broken rule named once it is corrupted', async () => {
      const healthy = await runCli(dbEnv());
      expect({ code: healthy.code, stderr: healthy.stderr }).toEqual({ code: 0, stderr: '' });
      expect(healthy.stdout).toContain('OK: every invariant holds');

      const [{ user_id }] = await q(`select user_id from wallets where balance > 0 order by user_id limit 1`);
      await t.app.db.fork().execute('update wallets set balance = balance + 1 where user_id = ?', [user_id]);
      try {
        const broken = await runCli(dbEnv());
        expect(broken.code).toBe(1);
        expect(broken.stdout).toContain('balance_matches_ledger');
        expect(broken.stdout).toContain(`wallet of user ${user_id}`);
      } finally {
        await t.app.db.fork().execute('update wallets set balance = balance - 1 where user_id = ?', [user_id]);
      }
    });

    it('exits 2 without creating anything when the database does not exist', async () => {
      if (onPostgres) {
        const url = new URL((t.app.config.database as { url: string }).url);
        const name = `${url.pathname.slice(1)}_missing`;
        url.pathname = `/${name}`;
        const res = await runCli({ DATABASE_URL: url.toString() });
        expect(res.code).toBe(2);
        expect(res.stderr).toContain('does not exist');
        const [{ n }] = await q(`select count(*) as n from pg_database where datname = ?`, [name]);
        expect(Number(n)).toBe(0);
      } else {
        const missing = path.join(t.dir, 'no-such.db');
        const res = await runCli({}, [missing]);
        expect(res.code).toBe(2);
        expect(res.stderr).toContain('no database file');
        expect(fs.existsSync(missing)).toBe(false);
      }
    });

    it('exits 2 on a database without the schema and does not migrate it', async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, 'foreign-'));
      let env: Record<string, string>;
      let args: string[] = [];
      const foreign = await createTestDatabase(dir);
      if (onPostgres) {
        env = foreign.env;
      } else {
        // An operator's arbitrary SQLite file: a database with a table of its own.
        const file = path.join(dir, 'other.db');
        const db = await openDatabase({ kind: 'sqlite', path: file }, pino({ level: 'silent' }), { migrate: false });
        await db.fork().execute('create table notes (body text)');
        await db.close();
        env = {};
        args = [file];
      }
      try {
        const res = await runCli(env, args);
        expect(res.code).toBe(2);
        expect(res.stderr).toContain('the billing schema is missing');
        const config = onPostgres
          ? { kind: 'postgresql' as const, url: env.DATABASE_URL }
          : { kind: 'sqlite' as const, path: args[0] };
        const db = await openDatabase(config, pino({ level: 'silent' }), { migrate: false });
        try {
          const tables = await db.fork().execute<{ name: string }[]>(
            onPostgres
              ? `select table_name as name from information_schema.tables where table_schema = 'public'`
              : `select name from sqlite_master where type = 'table'`,
          );
          expect(tables.map((x) => x.name)).toEqual(onPostgres ? [] : ['notes']);
        } finally {
          await db.close();
        }
      } finally {
        await foreign.drop();
      }
    });
  });
});
