/**
 * charging.ts carries out the charge decision with guarded writes; these run
 * it over fakes of its doors (no database) for what is hard to provoke for
 * real: a record that keeps changing under every attempt.
 */
import pino from 'pino';
import { createCharging } from '../../src/billing/charging';
import { StaleRecord, type BillingRecordsRepository, type ChargeRow } from '../../src/billing/records.repository';
import type { Database, Tx } from '../../src/db/database';
import { AppError } from '../../src/shared/errors';
import type { UsersRepository } from '../../src/users/users.repository';
import type { LedgerRepository } from '../../src/wallets/ledger.repository';

const now = new Date('2026-01-01T00:00:00Z');
const row: ChargeRow = { id: 7, userId: 3, amount: 5_000_000n, status: 'PENDING', attemptCount: 0, nextAttemptAt: now };

function setUp(apply: BillingRecordsRepository['apply']) {
  const tx = {} as Tx;
  let transactions = 0;
  const db = {
    transaction: async <T>(work: (t: Tx) => Promise<T>) => {
      transactions++;
      return work(tx);
    },
  } as unknown as Database;
  const records = { readForCharge: async () => [{ ...row }], apply } as unknown as BillingRecordsRepository;
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
  return { charging, transactions: () => transactions };
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
});
