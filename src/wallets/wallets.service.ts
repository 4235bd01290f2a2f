/**
 * Wallets: balances, top-ups and the ledger, through the ledger's door
 * (./ledger.repository.ts). A top-up is one short write (group commit on
 * SQLite); the settlement of unpaid records it triggers runs after its commit.
 */
import type { Logger } from 'pino';
import type { Database } from '../db/database';
import type { IdempotencyKeys } from '../db/idempotency';
import type { CallContext } from '../shared/context';
import type { Clock } from '../shared/clock';
import { failedPrecondition, invalidArgument, notFound } from '../shared/errors';
import { readPage, type PageRequest } from '../shared/paging';
import type { UsersRepository } from '../users/users.repository';
import type { LedgerRepository, WalletView } from './ledger.repository';
import type { WalletTransaction } from './wallet.entity';

export type { WalletView } from './ledger.repository';

export interface AddFundsResult {
  /** The wallet after the credit and the settlement it triggered. */
  wallet: WalletView;
  transaction: WalletTransaction;
  /** The unpaid records this call's settlement paid, oldest first. */
  settledRecordIds: number[];
  /** True when the request_id was seen before and nothing changed now. */
  replayed: boolean;
}

export interface WalletsService {
  getWallet(ctx: CallContext, userId: number): Promise<WalletView>;
  getBalance(ctx: CallContext, userId: number): Promise<bigint>;
  addFunds(ctx: CallContext, userId: number, amount: bigint, requestId: string): Promise<AddFundsResult>;
  listTransactions(ctx: CallContext, userId: number, page: PageRequest): Promise<{ items: WalletTransaction[]; nextPageToken: string }>;
}

export interface WalletsDeps {
  db: Database;
  clock: Clock;
  log: Logger;
  ledger: LedgerRepository;
  users: UsersRepository;
  idempotency: IdempotencyKeys;
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
  const { db, clock, log, ledger, users, idempotency, settle } = deps;

  async function readWallet(userId: number): Promise<WalletView> {
    const wallet = await ledger.read(userId);
    if (!wallet) throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
    return wallet;
  }

  return {
    getWallet: (_ctx, userId) => readWallet(userId),

    async getBalance(_ctx, userId) {
      return (await readWallet(userId)).balance;
    },

    async addFunds(ctx, userId, amount, rawRequestId) {
      if (amount <= 0n) throw invalidArgument('amount', 'NON_POSITIVE_AMOUNT', 'amount must be greater than zero');
      const key = idempotency.key('AddFunds', rawRequestId, { userId, amount });
      const result = await db.groupWrite(async (tx): Promise<AddFundsResult> => {
        if (key) {
          const txId = await idempotency.claim(tx, key);
          if (txId !== null) {
            // Replay the first response, rebuilt from its ledger row.
            const transaction = await ledger.transaction(tx, txId);
            const wallet = await ledger.wallet(tx, userId);
            return {
              wallet: { userId, balance: transaction.balanceAfter, createdAt: wallet.createdAt, updatedAt: transaction.createdAt },
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
        return { wallet: credited.wallet, transaction: credited.transaction, settledRecordIds: [], replayed: false };
      }, ctx);
      // Settle on a replay too: the first call may have died between the credit's commit and its settlement, and
      // settling twice is harmless (each record is charged at most once).
      if (!settle) return result;
      try {
        const { paidRecordIds } = await settle(userId);
        if (paidRecordIds.length === 0) return result;
        // The balance the caller can spend now, after the records it paid.
        return { ...result, wallet: await readWallet(userId), settledRecordIds: paidRecordIds };
      } catch (err) {
        log.error({ err, userId }, 'settling after AddFunds failed; the settlement sweep will finish it');
        deps.onSettleFailed?.();
        return result;
      }
    },

    async listTransactions(ctx, userId, pageReq) {
      const page = readPage(pageReq, { userId });
      await users.getLive(ctx.em, userId);
      return ledger.list(ctx.em, userId, page);
    },
  };
}
