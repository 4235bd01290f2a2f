/**
 * charging.ts carries out the charge decision with guarded writes; these run
 * it over fakes of its doors (no database) for what is hard to provoke for
 * real: a record that keeps changing under every attempt.
 */
import pino from 'pino';
import { createCharging } from '../../src/billing/charging';
import { StaleRecord, type BillingRecordsRepository, type ChargeRow } from '../../src/billing/records.repository';
import type { Database, TransactionOptions, Tx } from '../../src/db/database';
import { GroupCommit } from '../../src/db/group-commit';
import { AppError } from '../../src/shared/errors';
import type { UsersRepository } from '../../src/users/users.repository';
import type { LedgerRepository } from '../../src/wallets/ledger.repository';

const now = new Date('2026-01-01T00:00:00Z');
const row: ChargeRow = { id: 7, userId: 3, amount: 5_000_000n, status: 'PENDING', attemptCount: 0, nextAttemptAt: now };

/**
 * Charging over fakes of its doors and a real GroupCommit on a fake
 * transaction (what db.groupWrite is on SQLite): `groups` counts the shared
 * transactions, `statements` the savepoint statements run in them.
 */
function setUp(apply: BillingRecordsRepository['apply']) {
  const statements: string[] = [];
  const tx = {
    em: { clear: () => undefined },
    run: async (sql: string) => {
      statements.push(sql);
      return 0;
    },
  } as unknown as Tx;
  let groups = 0;
  const group = new GroupCommit(async (work) => {
    groups++;
    return work(tx);
  });
  const db = {
    groupWrite: <T>(work: (t: Tx) => Promise<T>, opts?: TransactionOptions) => group.submit(work, opts?.signal),
  } as unknown as Database;
  const read: number[] = [];
  const records = {
    readForCharge: async (_tx: Tx, ids: number[]) => {
      read.push(...ids);
      return ids.map((id) => ({ ...row, id }));
    },
    apply,
  } as unknown as BillingRecordsRepository;
  const ledger = {
    lockBalances: async () => new Map([[3, 10_000_000n]]),
    debit: async () => ({}),
    debitMany: async () => true,
  } as unknown as LedgerRepository;
  const users = { reactivateIfSettled: async () => undefined, suspendForNonPayment: async () => false } as unknown as UsersRepository;
  const charging = createCharging({
    db,
    clock: { now: () => now },
    log: pino({ level: 'silent' }),
    policy: { retryBaseDelayMs: 1000, maxRetries: 5 },
    records,
    ledger,
    users,
  });
  return { charging, transactions: () => groups, statements, read };
}

describe('charging one record', () => {
  it('reads the record again when another charger moved it first, and succeeds once the write holds', async () => {
    let calls = 0;
    const { charging, transactions } = setUp(async () => {
      if (++calls < 3) throw new StaleRecord();
    });
    expect(await charging.chargeOne(7, 'manual')).toEqual({ outcome: 'CHARGED', userSuspended: false });
    expect(transactions()).toBe(3);
  });

  it('gives up with ABORTED/CONCURRENT_UPDATE (retryable) after 10 rounds that all lost, instead of INTERNAL', async () => {
    const { charging, transactions } = setUp(async () => {
      throw new StaleRecord();
    });
    const err = await charging.chargeOne(7, 'manual').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AppError);
    expect({ kind: (err as AppError).kind, reason: (err as AppError).reason }).toEqual({ kind: 'ABORTED', reason: 'CONCURRENT_UPDATE' });
    expect(transactions()).toBe(10);
  });

  it('passes any other failure through at once', async () => {
    const { charging, transactions } = setUp(async () => {
      throw new Error('disk on fire');
    });
    await expect(charging.chargeOne(7, 'manual')).rejects.toThrow('disk on fire');
    expect(transactions()).toBe(1);
  });

  it('an attempt that lost to another charger is rolled back to its savepoint alone: the attempt beside it in the same transaction commits, and the lost one is made again in the next', async () => {
    let lost = false;
    const { charging, transactions, statements } = setUp(async (_tx, transitions) => {
      if (transitions[0].row.id === 7 && !lost) {
        lost = true;
        throw new StaleRecord();
      }
    });
    const results = await Promise.all([charging.chargeOne(7, 'manual'), charging.chargeOne(8, 'manual')]);
    expect(results.map((r) => r.outcome)).toEqual(['CHARGED', 'CHARGED']);
    expect(transactions()).toBe(2);
    expect(statements.filter((s) => s.startsWith('rollback to'))).toHaveLength(1);
    expect(statements.filter((s) => s.startsWith('savepoint'))).toHaveLength(3);
  });

  it('makes no attempt for a caller that went away before its turn', async () => {
    const { charging, read } = setUp(async () => undefined);
    const gone = new AbortController();
    gone.abort(new AppError('CANCELLED', 'CALL_CANCELLED', 'gone'));
    await expect(charging.chargeOne(7, 'manual', gone.signal)).rejects.toMatchObject({ kind: 'CANCELLED' });
    expect(read).toEqual([]);
  });
});
