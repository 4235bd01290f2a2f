/**
 * Wallets: balances, top-ups and the ledger, through the ledger's door
 * (./ledger.repository.ts). A top-up is one short write (group commit on
 * SQLite); the settlement of unpaid records it triggers runs after its commit.
 *
 * The available balance is what the user can still spend: the balance, minus
 * the usage recorded and not billed yet priced exactly as the next billing run
 * will price it (per service, total quantity x today's unit price, rounded
 * once; a service with no price counts 0 until it has one), minus the user's
 * unpaid records. Its parts are kept in the transactions that move them (the
 * pending totals by the usage door), so reading it is three point reads.
 */
import type { Logger } from 'pino';
import { readIn, type Database, type Tx } from '../db/database';
import type { IdempotencyKeys } from '../db/idempotency';
import type { CallContext } from '../shared/context';
import type { Clock } from '../shared/clock';
import { failedPrecondition, invalidArgument, notFound } from '../shared/errors';
import { readPage, type PageRequest } from '../shared/paging';
import type { BillingRecordsRepository } from '../billing/records.repository';
import type { UsageLogsRepository } from '../usage/usage-logs.repository';
import type { UsersRepository } from '../users/users.repository';
import { unbilledValue } from './available';
import type { BalanceAlerts, BalanceAlertView } from './balance-alerts';
import type { LedgerRepository, WalletView, WalletWithAvailable } from './ledger.repository';
import type { WalletTransaction } from './wallet.entity';

export type { WalletView, WalletWithAvailable } from './ledger.repository';
export type { BalanceAlertView } from './balance-alerts';

export interface AddFundsResult {
  /** The wallet after the credit and the settlement it triggered. */
  wallet: WalletWithAvailable;
  transaction: WalletTransaction;
  /** The unpaid records this call's settlement paid, oldest first. */
  settledRecordIds: number[];
  /** True when the request_id was seen before and nothing changed now. */
  replayed: boolean;
}

export interface WalletsService {
  getWallet(ctx: CallContext, userId: number): Promise<WalletWithAvailable>;
  getBalance(ctx: CallContext, userId: number): Promise<{ balance: bigint; available: bigint }>;
  addFunds(ctx: CallContext, userId: number, amount: bigint, requestId: string): Promise<AddFundsResult>;
  listTransactions(ctx: CallContext, userId: number, page: PageRequest): Promise<{ items: WalletTransaction[]; nextPageToken: string }>;
  /** SetBalanceAlert: threshold in micros (>= 0), or null for the deployment's LOW_BALANCE_THRESHOLD. */
  setBalanceAlert(ctx: CallContext, userId: number, threshold: bigint | null): Promise<BalanceAlertView>;
  getBalanceAlert(ctx: CallContext, userId: number): Promise<BalanceAlertView>;
}

export interface WalletsDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  ledger: LedgerRepository;
  users: UsersRepository;
  records: BillingRecordsRepository;
  usageLogs: UsageLogsRepository;
  idempotency: IdempotencyKeys;
  pricing: ReadonlyMap<string, bigint>;
  /** The balance alerts: a credit evaluates them in its transaction. */
  alerts: BalanceAlerts;
  /**
   * Called after a credit commits, and again when the credit's request_id is
   * replayed: charges the user's unpaid records (the billing engine's
   * settlement). Its failure never undoes the credit: it is logged and
   * `onSettleFailed` asks the retry scheduler's settlement sweep to finish it.
   */
  settle?: (userId: number) => Promise<{ paidRecordIds: number[] }>;
  onSettleFailed?: () => void;
}

export function createWalletsService(deps: WalletsDeps): WalletsService {
  const { db, clock, log, ledger, users, records, usageLogs, idempotency, settle, pricing, alerts } = deps;

  /** The wallet and its available balance, all from one snapshot of committed data; null for no live user. */
  const withOwed = (wallet: WalletView, owed: bigint): WalletWithAvailable => ({ ...wallet, available: wallet.balance - owed });

  async function readWallet(userId: number): Promise<WalletWithAvailable | null> {
    const read = await ledger.readWithOwed(userId);
    if (!read) return null;
    return withOwed(read.wallet, unbilledValue(read.pending, pricing) + read.unpaid);
  }

  async function liveWallet(userId: number): Promise<WalletWithAvailable> {
    const wallet = await readWallet(userId);
    if (!wallet) throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
    return wallet;
  }

  return {
    getWallet: (_ctx, userId) => liveWallet(userId),

    getBalance: (_ctx, userId) => liveWallet(userId),

    async addFunds(ctx, userId, amount, rawRequestId) {
      if (amount <= 0n) throw invalidArgument('amount', 'NON_POSITIVE_AMOUNT', 'amount must be greater than zero');
      const key = idempotency.key('AddFunds', rawRequestId, { userId, amount });
      /** What the user owes against the balance as of `tx`: unbilled usage at today's prices and unpaid records. */
      const owedIn = async (tx: Tx): Promise<bigint> => {
        const totals = await usageLogs.pendingTotals(userId, readIn(tx));
        return unbilledValue(totals, pricing) + (await records.unpaidTotal(userId, readIn(tx)));
      };
      const result = await db.groupWrite(async (tx): Promise<AddFundsResult> => {
        if (key) {
          const txId = await idempotency.claim(tx, key);
          if (txId !== null) {
            // Replay the first response, rebuilt from its ledger row.
            const transaction = await ledger.transaction(tx, txId);
            const wallet = await ledger.wallet(tx, userId);
            return {
              wallet: withOwed({ userId, balance: transaction.balanceAfter, createdAt: wallet.createdAt, updatedAt: transaction.createdAt }, await owedIn(tx)),
              transaction,
              settledRecordIds: [],
              replayed: true,
            };
          }
        }
        const now = clock.now();
        const credited = await ledger.credit(tx, userId, amount, key?.requestId ?? null, now);
        if (!credited.ok) {
          if (credited.why === 'CLOSED') {
            await users.getLive(tx.em, userId); // NOT_FOUND for a deleted or unknown user
            throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
          }
          throw failedPrecondition('BALANCE_OVERFLOW', 'the balance would exceed the largest amount a wallet can hold');
        }
        if (key) await idempotency.complete(tx, key, credited.transaction.id, now);
        // The alert's evaluation reads the available balance (after its lock); the answer gives the same one.
        const available = (await alerts.evaluate(tx, [userId], now)).get(userId)!;
        return { wallet: { ...credited.wallet, available }, transaction: credited.transaction, settledRecordIds: [], replayed: false };
      }, ctx);
      // Settle on a replay too: the first call may have died between the credit's commit and its settlement, and
      // settling twice is harmless (each record is charged at most once).
      let settled: number[] = [];
      try {
        if (settle) settled = (await settle(userId)).paidRecordIds;
      } catch (err) {
        log.error({ err, userId }, 'settling after AddFunds failed; the settlement sweep will finish it');
        deps.onSettleFailed?.();
      }
      if (settled.length === 0) return result;
      // The balance the caller can spend now, after the records it paid (if that read fails: the wallet the credit left).
      const after = await readWallet(userId).catch((err: unknown) => {
        log.warn({ err, userId }, 'reading the wallet after a settlement failed; answering with the wallet the credit left');
        return null;
      });
      return { ...result, wallet: after ?? result.wallet, settledRecordIds: settled };
    },

    async setBalanceAlert(ctx, userId, threshold) {
      if (threshold !== null && threshold < 0n) throw invalidArgument('threshold', 'NEGATIVE_THRESHOLD', 'threshold must be zero or more');
      return alerts.set(userId, threshold, ctx.signal);
    },

    getBalanceAlert: (_ctx, userId) => alerts.get(userId),

    async listTransactions(ctx, userId, pageReq) {
      const page = readPage(pageReq, { userId });
      await users.getLive(ctx.em, userId);
      return ledger.list(ctx.em, userId, page);
    },
  };
}
