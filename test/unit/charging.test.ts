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
 * transactions, `statements` the savepoint statements run in them. The
 * batched path's transactions (db.transaction) are counted in `batches`;
 * `committed` lists the records whose transitions committed (a batch that
 * throws is rolled back), and `reads` each readForCharge's ids.
 */
function setUp(apply: BillingRecordsRepository['apply'], balance = 10_000_000n) {
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
  const committed: number[] = [];
  let open: number[] | null = null;
  let batches = 0;
  const db = {
    groupWrite: <T>(work: (t: Tx) => Promise<T>, opts?: TransactionOptions) => group.submit(work, opts?.signal),
    async transaction<T>(work: (t: Tx) => Promise<T>) {
      batches++;
      open = [];
      try {
        const value = await work(tx);
        committed.push(...open);
        return value;
      } finally {
        open = null;
      }
    },
  } as unknown as Database;
  const read: number[] = [];
  const reads: number[][] = [];
  const records = {
    readForCharge: async (_tx: Tx, ids: number[]) => {
      read.push(...ids);
      reads.push([...ids]);
      return ids.map((id) => ({ ...row, id }));
    },
    async apply(t: Tx, transitions: Parameters<BillingRecordsRepository['apply']>[1], at: Date) {
      await apply(t, transitions, at);
      (open ?? committed).push(...transitions.map((tr) => tr.row.id));
    },
  } as unknown as BillingRecordsRepository;
  const ledger = {
    lockBalances: async () => new Map([[3, balance]]),
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
  return { charging, transactions: () => groups, statements, read, reads, committed, batches: () => batches };
}

const ids = (n: number) => Array.from({ length: n }, (_, i) => i + 1);
const sizes = (reads: number[][]) => reads.map((r) => r.length);

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

describe('charging many records (new records, due retries)', () => {
  const plenty = 1_000_000_000_000n;

  it('charges new records 500 to a transaction', async () => {
    const { charging, reads, committed, batches } = setUp(async () => undefined, plenty);
    const counts = await charging.chargeMany(ids(1200), 'new');
    expect(counts).toEqual({ chargesSucceeded: 1200, retriesScheduled: 0, recordsFailed: 0, usersSuspended: 0 });
    expect(sizes(reads)).toEqual([500, 500, 200]);
    expect(batches()).toBe(3);
    expect(committed).toEqual(ids(1200));
  });

  it('charges due retries 5,000 to a transaction', async () => {
    const { charging, reads, committed, batches } = setUp(async () => undefined, plenty);
    const counts = await charging.chargeMany(ids(6000), 'retry');
    expect(counts.chargesSucceeded).toBe(6000);
    expect(sizes(reads)).toEqual([5000, 1000]);
    expect(batches()).toBe(2);
    expect(committed).toEqual(ids(6000));
  });

  it('a transaction that met a concurrent change is rolled back and its records are charged one at a time; the others stay batches; each record once', async () => {
    let lost = false;
    const { charging, reads, committed, batches, transactions } = setUp(async (_tx, transitions) => {
      if (!lost && transitions.some((t) => t.row.id === 700)) {
        lost = true;
        throw new StaleRecord();
      }
    }, plenty);
    const counts = await charging.chargeMany(ids(1500), 'new');
    expect(counts.chargesSucceeded).toBe(1500);
    expect(sizes(reads)).toEqual([500, 500, ...Array(500).fill(1), 500]);
    expect(batches()).toBe(3);
    expect(transactions()).toBe(500);
    expect(committed).toEqual(ids(1500));
  });
});
