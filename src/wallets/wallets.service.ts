/**
 * Wallets and their ledger. The balance is a cache of the ledger: every
 * credit and debit updates the balance with a conditional UPDATE and writes a
 * ledger row in the same transaction, so `balance == credits - debits` and
 * `balance >= 0` hold on SQLite (which ignores row locks) and PostgreSQL alike.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import { checkRequestId, findIdempotent, requestHash, saveIdempotent } from '../db/idempotency';
import { groupCommit } from '../db/group-commit';
import { isPostgres } from '../db/platform';
import { rawRead, rawSql } from '../db/raw';
import { epochMs, int64 } from '../db/types';
import type { Clock } from '../shared/clock';
import { failedPrecondition, invalidArgument, notFound } from '../shared/errors';
import { INT64_MAX } from '../shared/money';
import { pageOf, readPage, type PageRequest } from '../shared/paging';
import { getLiveUser } from '../users/users.service';
import { Wallet, WalletTransaction } from './wallet.entity';

export interface WalletView {
  userId: number;
  balance: bigint;
  createdAt: Date;
  updatedAt: Date;
}

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
  getWallet(em: EntityManager, userId: number): Promise<WalletView>;
  getBalance(em: EntityManager, userId: number): Promise<bigint>;
  addFunds(em: EntityManager, userId: number, amount: bigint, requestId: string): Promise<AddFundsResult>;
  listTransactions(em: EntityManager, userId: number, page: PageRequest): Promise<{ items: WalletTransaction[]; nextPageToken: string }>;
}

type LedgerRow = {
  id: number | string;
  user_id: number | string;
  type: 'CREDIT' | 'DEBIT';
  amount: string;
  balance_after: string;
  billing_record_id: number | string | null;
  request_id: string | null;
  created_at: number | string;
};

const LEDGER_COLUMNS =
  'id, user_id, type, cast(amount as text) as amount, cast(balance_after as text) as balance_after, billing_record_id, request_id, created_at';

function toTransaction(row: LedgerRow): WalletTransaction {
  const t = new WalletTransaction();
  t.id = Number(row.id);
  t.userId = Number(row.user_id);
  t.type = row.type;
  t.amount = int64(row.amount);
  t.balanceAfter = int64(row.balance_after);
  t.billingRecordId = row.billing_record_id === null ? null : Number(row.billing_record_id);
  t.requestId = row.request_id;
  t.createdAt = epochMs(row.created_at);
  return t;
}

async function insertLedgerRow(
  tx: EntityManager,
  row: { userId: number; type: 'CREDIT' | 'DEBIT'; amount: bigint; balanceAfter: bigint; billingRecordId: number | null; requestId: string | null; now: Date },
): Promise<WalletTransaction> {
  const sql = await rawSql(tx);
  const inserted = await sql.all<LedgerRow>(
    `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at)
     values (?, ?, cast(? as bigint), cast(? as bigint), ?, ?, ?) returning ${LEDGER_COLUMNS}`,
    [row.userId, row.type, row.amount.toString(), row.balanceAfter.toString(), row.billingRecordId, row.requestId, row.now.getTime()],
    { reuse: 'connection' },
  );
  return toTransaction(inserted[0]);
}

/**
 * Debits a wallet for a billing record inside the caller's transaction.
 * Returns the DEBIT ledger row, or null when the balance is short (nothing
 * changes then). The UPDATE's condition is what keeps the balance >= 0.
 */
export async function debitWallet(
  tx: EntityManager,
  userId: number,
  amount: bigint,
  billingRecordId: number,
  now: Date,
): Promise<WalletTransaction | null> {
  const sql = await rawSql(tx);
  const updated = await sql.all<{ balance: string }>(
    `update wallets set balance = balance - cast(? as bigint), updated_at = ?
     where user_id = ? and balance >= cast(? as bigint) and closed_at is null returning cast(balance as text) as balance`,
    [amount.toString(), now.getTime(), userId, amount.toString()],
    { reuse: 'connection' },
  );
  if (updated.length === 0) return null;
  return insertLedgerRow(tx, {
    userId,
    type: 'DEBIT',
    amount,
    balanceAfter: int64(updated[0].balance),
    billingRecordId,
    requestId: null,
    now,
  });
}

/**
 * Closes the wallet of a user being deleted, if it is open and empty, inside
 * the caller's transaction. One conditional UPDATE of the wallet row: it
 * queues behind (PostgreSQL row lock) or after (SQLite's one writer) any
 * credit or debit of the same wallet. Returns false when the balance is not
 * zero (or the wallet is closed already).
 */
export async function closeEmptyWallet(tx: EntityManager, userId: number, now: Date): Promise<boolean> {
  const res = await tx.execute<{ affectedRows: number }>(
    'update wallets set closed_at = ?, updated_at = ? where user_id = ? and closed_at is null and balance = 0',
    [now.getTime(), now.getTime(), userId],
    'run',
  );
  return res.affectedRows === 1;
}

/**
 * Holds an open wallet until the caller's transaction ends (a share lock on
 * PostgreSQL), so a user cannot be deleted while a billing record for them is
 * being created; throws NOT_FOUND when the wallet is closed or missing.
 */
export async function holdOpenWallet(tx: EntityManager, userId: number): Promise<void> {
  const rows = await tx.execute<{ user_id: number }[]>(
    `select user_id from wallets where user_id = ? and closed_at is null${isPostgres(tx) ? ' for share' : ''}`,
    [userId],
  );
  if (rows.length === 0) throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
}

export interface WalletsDeps {
  clock: Clock;
  log: Logger;
  /**
   * Called after a credit commits, and again when the credit's request_id is
   * replayed: charges the user's unpaid records (the billing engine's
   * settlement). Its failure never undoes the credit: it is logged and
   * `onSettleFailed` asks the retry scheduler's settlement sweep to finish it.
   */
  settle?: (em: EntityManager, userId: number) => Promise<{ paidRecordIds: number[] }>;
  onSettleFailed?: () => void;
}

export function createWalletsService(deps: WalletsDeps): WalletsService {
  const { clock, log, settle } = deps;

  async function readWallet(em: EntityManager, userId: number): Promise<WalletView> {
    // The hottest read of the service: a prepared statement on the pooled connection (see db/raw.ts).
    const rows = await rawRead<{ balance: string; created_at: number | string; updated_at: number | string }>(
      em,
      `select cast(w.balance as text) as balance, w.created_at, w.updated_at
       from wallets w join users u on u.id = w.user_id where w.user_id = ? and u.deleted_at is null`,
      [userId],
    );
    if (rows.length === 0) throw notFound('USER_NOT_FOUND', `user ${userId} not found`);
    const r = rows[0];
    return { userId, balance: int64(r.balance), createdAt: epochMs(r.created_at), updatedAt: epochMs(r.updated_at) };
  }

  return {
    getWallet: readWallet,

    async getBalance(em, userId) {
      return (await readWallet(em, userId)).balance;
    },

    async addFunds(em, userId, amount, rawRequestId) {
      if (amount <= 0n) throw invalidArgument('amount', 'NON_POSITIVE_AMOUNT', 'amount must be greater than zero');
      const requestId = checkRequestId(rawRequestId);
      const hash = requestHash({ userId, amount });
      // Group commit on SQLite: concurrent credits share one COMMIT (db/group-commit.ts).
      const result = await groupCommit(em, async (tx, sql): Promise<AddFundsResult> => {
        if (requestId) {
          const txId = await findIdempotent(tx, 'AddFunds', requestId, hash);
          if (txId !== null) {
            // Replay the first response, rebuilt from its ledger row.
            const rows = await tx.execute<LedgerRow[]>(`select ${LEDGER_COLUMNS} from wallet_transactions where id = ?`, [txId]);
            const transaction = toTransaction(rows[0]);
            const wallet = await tx.findOneOrFail(Wallet, { userId });
            return {
              wallet: { userId, balance: transaction.balanceAfter, createdAt: wallet.createdAt, updatedAt: transaction.createdAt },
              transaction,
              settledRecordIds: [],
              replayed: true,
            };
          }
        }
        const now = clock.now();
        // One statement credits an open wallet (its user is not deleted); when it changes nothing, find out why.
        const updated = await sql.all<{ balance: string; created_at: number | string }>(
          `update wallets set balance = balance + cast(? as bigint), updated_at = ?
           where user_id = ? and balance <= cast(? as bigint) and closed_at is null
           returning cast(balance as text) as balance, created_at`,
          [amount.toString(), now.getTime(), userId, (INT64_MAX - amount).toString()],
          { reuse: 'connection' },
        );
        if (updated.length === 0) {
          await getLiveUser(tx, userId); // NOT_FOUND first, as before
          throw failedPrecondition('BALANCE_OVERFLOW', 'the balance would exceed the largest amount a wallet can hold');
        }
        const balance = int64(updated[0].balance);
        const transaction = await insertLedgerRow(tx, {
          userId,
          type: 'CREDIT',
          amount,
          balanceAfter: balance,
          billingRecordId: null,
          requestId,
          now,
        });
        if (requestId) await saveIdempotent(tx, 'AddFunds', requestId, hash, transaction.id, now);
        return {
          wallet: { userId, balance, createdAt: epochMs(updated[0].created_at), updatedAt: now },
          transaction,
          settledRecordIds: [],
          replayed: false,
        };
      });
      // Settle on a replay too: the first call may have died between the credit's commit and its settlement, and
      // settling twice is harmless (each record is charged at most once).
      if (!settle) return result;
      try {
        const { paidRecordIds } = await settle(em, userId);
        if (paidRecordIds.length === 0) return result;
        // The balance the caller can spend now, after the records it paid.
        return { ...result, wallet: await readWallet(em, userId), settledRecordIds: paidRecordIds };
      } catch (err) {
        log.error({ err, userId }, 'settling after AddFunds failed; the settlement sweep will finish it');
        deps.onSettleFailed?.();
        return result;
      }
    },

    async listTransactions(em, userId, pageReq) {
      const page = readPage(pageReq, { userId });
      await getLiveUser(em, userId);
      const rows = await em.find(
        WalletTransaction,
        { userId, id: { $gt: page.afterId } },
        { orderBy: { id: 'asc' }, limit: page.limit },
      );
      return pageOf(rows, page);
    },
  };
}
