/**
 * The door of the `wallets` and `wallet_transactions` tables: the only code
 * that writes them. The balance is a cache of the ledger: every credit and
 * debit is a conditional UPDATE of the wallet row plus its ledger row, in the
 * caller's transaction, so `balance == credits - debits` and `balance >= 0`
 * hold on SQLite (which ignores row locks) and PostgreSQL alike. A wallet is
 * closed when its user is deleted, on the same row, so a delete and a
 * credit or debit of the wallet can never both commit. Every ledger row
 * writes its event (wallet.credited / wallet.debited, ref_id = the row's id)
 * in the same statement's transaction, through the events' door.
 */
import type { EntityManager } from '@mikro-orm/knex';
import type { Database, Read, Tx } from '../db/database';
import { epochMs, int64 } from '../db/types';
import type { EventsRepository } from '../events/events.repository';
import type { NewEvent } from '../events/events.types';
import { INT64_MAX } from '../shared/money';
import { pageOf, type Page } from '../shared/paging';
import { unpaidColumns, unpaidOf, type UnpaidColumns } from '../billing/records.repository';
import { pendingOf, pendingTotalsJoin, type PendingColumns } from '../usage/usage-logs.repository';
import { Wallet, WalletTransaction } from './wallet.entity';

export interface WalletView {
  userId: number;
  balance: bigint;
  createdAt: Date;
  updatedAt: Date;
}

/** A wallet with what its user can still spend (see WalletsService). */
export interface WalletWithAvailable extends WalletView {
  available: bigint;
}

/** A credit's outcome: the ledger row and the wallet after it, or why nothing changed. */
export type CreditResult =
  | { ok: true; wallet: WalletView; transaction: WalletTransaction }
  | { ok: false; why: 'CLOSED' | 'OVERFLOW' };

/** One debit of a batch: a record's amount from its user's wallet. */
export interface Debit {
  userId: number;
  amount: bigint;
  billingRecordId: number;
}

export interface LedgerRepository {
  /** Opens the wallet of a new user (balance 0). */
  open(tx: Tx, userId: number, now: Date): Promise<void>;
  /** Credits an open wallet (never past INT64_MAX). */
  credit(tx: Tx, userId: number, amount: bigint, requestId: string | null, now: Date): Promise<CreditResult>;
  /** Debits an open wallet for a billing record; null when the balance is short (nothing changes then). */
  debit(tx: Tx, debit: Debit, now: Date): Promise<WalletTransaction | null>;
  /**
   * Debits many records at once, from wallets read with lockBalances in the
   * same transaction: false (nothing to trust; roll back) when any wallet
   * does not end exactly where `expected` says.
   */
  debitMany(tx: Tx, debits: readonly Debit[], expected: ReadonlyMap<number, bigint>, now: Date): Promise<boolean>;
  /** The spendable balance of each user's open wallet (absent: closed or none), locked until `tx` ends (PostgreSQL). */
  lockBalances(tx: Tx, userIds: readonly number[]): Promise<Map<number, bigint>>;
  /** Closes the wallet if it is open and empty; false otherwise (a user being deleted). */
  closeIfEmpty(tx: Tx, userId: number, now: Date): Promise<boolean>;
  /** Holds the wallet open until `tx` ends (PostgreSQL share lock); false when it is closed or missing. */
  holdOpen(tx: Tx, userId: number): Promise<boolean>;
  /**
   * The balance of each user's open wallet (absent: closed or none), share-locked until `tx` ends (PostgreSQL):
   * no credit or charge of these wallets commits meanwhile. A share lock never waits for another, nor for this
   * transaction's own update of the row (a credit).
   */
  shareBalances(tx: Tx, userIds: readonly number[]): Promise<Map<number, bigint>>;
  /**
   * Whether each user's wallet is open (a live user) or closed (a deleted
   * one); absent: no such user. The open ones are held open until `tx` ends.
   */
  holdOpenMany(tx: Tx, userIds: readonly number[]): Promise<Map<number, 'open' | 'closed'>>;
  /** The wallet of a live user as committed now; null when the user is deleted or unknown. */
  read(userId: number, read?: Read): Promise<WalletView | null>;
  /**
   * GetBalance's read: the wallet of a live user with what they owe against
   * it, their pending usage per service and their unpaid total, as committed
   * now, in one statement: one snapshot on either database without a
   * transaction. null when the user is deleted or unknown.
   */
  readWithOwed(userId: number): Promise<{ wallet: WalletView; pending: Map<string, bigint>; unpaid: bigint } | null>;
  /** One ledger row (a replayed credit's). */
  transaction(tx: Tx, id: number): Promise<WalletTransaction>;
  /** The wallet row in `tx`'s unit of work. */
  wallet(tx: Tx, userId: number): Promise<Wallet>;
  list(em: EntityManager, userId: number, page: Page): Promise<{ items: WalletTransaction[]; nextPageToken: string }>;
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

/** Wallets per balance read. */
const BALANCE_ROWS = 5000;
/** Ledger rows per multi-row INSERT (5 parameters each). */
const LEDGER_ROWS = 1000;

const debited = (id: number, userId: number, amount: bigint, balanceAfter: bigint, billingRecordId: number): NewEvent => ({
  type: 'wallet.debited',
  userId,
  refId: id,
  payload: { transactionId: id, amount, balanceAfter, billingRecordId },
});

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

const pending = pendingTotalsJoin('w.user_id');
/** readWithOwed's statement: one text, made once (a statement's cache looks its text up on every call). */
const WITH_OWED_SQL = `select cast(w.balance as text) as balance, w.created_at, w.updated_at, ${unpaidColumns('w.user_id')}, ${pending.columns}
  from wallets w join users u on u.id = w.user_id ${pending.join} where w.user_id = ? and u.deleted_at is null`;

export function createLedgerRepository(db: Database, events: EventsRepository): LedgerRepository {
  async function insertRow(
    tx: Tx,
    row: { userId: number; type: 'CREDIT' | 'DEBIT'; amount: bigint; balanceAfter: bigint; billingRecordId: number | null; requestId: string | null; now: Date },
  ): Promise<WalletTransaction> {
    const [inserted] = await tx.all<LedgerRow>(
      `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at)
       values (?, ?, cast(? as bigint), cast(? as bigint), ?, ?, ?) returning ${LEDGER_COLUMNS}`,
      [row.userId, row.type, row.amount.toString(), row.balanceAfter.toString(), row.billingRecordId, row.requestId, row.now.getTime()],
      { keep: true },
    );
    return toTransaction(inserted);
  }

  /** The balance of each user's open wallet, read in user order with `lock` (a row-lock clause, '' on SQLite). */
  async function balancesOf(tx: Tx, userIds: readonly number[], lock: string): Promise<Map<number, bigint>> {
    const balances = new Map<number, bigint>();
    const sorted = [...new Set(userIds)].sort((a, b) => a - b);
    for (let i = 0; i < sorted.length; i += BALANCE_ROWS) {
      const part = sorted.slice(i, i + BALANCE_ROWS);
      const rows = await tx.all<{ user_id: number | string; balance: string }>(
        `select user_id, cast(balance as text) as balance from wallets
         where user_id in (${part.map(() => '?').join(', ')}) and closed_at is null order by user_id${lock}`,
        part,
        { keep: part.length === 1 }, // one user (every single charge): one fixed text, kept prepared
      );
      for (const r of rows) balances.set(Number(r.user_id), int64(r.balance));
    }
    return balances;
  }

  return {
    async open(tx, userId, now) {
      await tx.em.insert(Wallet, new Wallet(userId, now));
    },

    async credit(tx, userId, amount, requestId, now) {
      const updated = await tx.all<{ balance: string; created_at: number | string }>(
        `update wallets set balance = balance + cast(? as bigint), updated_at = ?
         where user_id = ? and balance <= cast(? as bigint) and closed_at is null
         returning cast(balance as text) as balance, created_at`,
        [amount.toString(), now.getTime(), userId, (INT64_MAX - amount).toString()],
        { keep: true },
      );
      if (updated.length === 0) {
        const open = await tx.all('select 1 as x from wallets where user_id = ? and closed_at is null', [userId], { keep: true });
        return { ok: false, why: open.length === 0 ? 'CLOSED' : 'OVERFLOW' };
      }
      const balance = int64(updated[0].balance);
      const transaction = await insertRow(tx, { userId, type: 'CREDIT', amount, balanceAfter: balance, billingRecordId: null, requestId, now });
      await events.append(
        tx,
        [{ type: 'wallet.credited', userId, refId: transaction.id, payload: { transactionId: transaction.id, amount, balanceAfter: balance, requestId: requestId ?? '' } }],
        now,
      );
      return { ok: true, wallet: { userId, balance, createdAt: epochMs(updated[0].created_at), updatedAt: now }, transaction };
    },

    async debit(tx, { userId, amount, billingRecordId }, now) {
      const updated = await tx.all<{ balance: string }>(
        `update wallets set balance = balance - cast(? as bigint), updated_at = ?
         where user_id = ? and balance >= cast(? as bigint) and closed_at is null returning cast(balance as text) as balance`,
        [amount.toString(), now.getTime(), userId, amount.toString()],
        { keep: true },
      );
      if (updated.length === 0) return null;
      const balanceAfter = int64(updated[0].balance);
      const row = await insertRow(tx, { userId, type: 'DEBIT', amount, balanceAfter, billingRecordId, requestId: null, now });
      await events.append(tx, [debited(row.id, userId, amount, balanceAfter, billingRecordId)], now);
      return row;
    },

    async debitMany(tx, debits, expected, now) {
      if (debits.length === 0) return true;
      const at = now.getTime();
      const total = new Map<number, bigint>();
      for (const d of debits) total.set(d.userId, (total.get(d.userId) ?? 0n) + d.amount);
      const users = [...total.keys()];
      const updated = await tx.all<{ user_id: number | string; balance: string }>(
        `update wallets set balance = wallets.balance - v.amount, updated_at = ?
         from (select column1 as user_id, column2 as amount from (values ${users.map(() => '(cast(? as bigint), cast(? as bigint))').join(', ')}) as t) as v
         where wallets.user_id = v.user_id and wallets.balance >= v.amount and wallets.closed_at is null
         returning wallets.user_id, cast(wallets.balance as text) as balance`,
        [at, ...users.flatMap((u) => [u, total.get(u)!.toString()])],
      );
      // Each wallet must end exactly where the caller's replay says, else its balance moved under us.
      const ok = updated.length === users.length && updated.every((w) => int64(w.balance) === expected.get(Number(w.user_id)));
      if (!ok) return false;
      // balance_after of each row: walk each wallet down from its balance before the batch, in the given order.
      const running = new Map<number, bigint>(users.map((u) => [u, expected.get(u)! + total.get(u)!]));
      const afters = debits.map((d) => {
        const after = running.get(d.userId)! - d.amount;
        running.set(d.userId, after);
        return after;
      });
      const written: NewEvent[] = [];
      for (let i = 0; i < debits.length; i += LEDGER_ROWS) {
        const part = debits.slice(i, i + LEDGER_ROWS);
        const inserted = await tx.all<{ id: number | string; billing_record_id: number | string }>(
          `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at)
           values ${part.map(() => `(?, 'DEBIT', cast(? as bigint), cast(? as bigint), ?, null, ?)`).join(', ')}
           returning id, billing_record_id`,
          part.flatMap((d, k) => [d.userId, d.amount.toString(), afters[i + k].toString(), d.billingRecordId, at]),
          { keep: part.length === LEDGER_ROWS }, // a full part: one fixed text, kept prepared
        );
        // Matched by record (one DEBIT per record), not by the order RETURNING happens to give.
        const idOf = new Map(inserted.map((r) => [Number(r.billing_record_id), Number(r.id)]));
        part.forEach((d, k) => written.push(debited(idOf.get(d.billingRecordId)!, d.userId, d.amount, afters[i + k], d.billingRecordId)));
      }
      await events.append(tx, written, now);
      return true;
    },

    // PostgreSQL: locked in user order, as every batch locks them, so two batches never deadlock.
    lockBalances: (tx, userIds) => balancesOf(tx, userIds, db.forUpdate()),

    async closeIfEmpty(tx, userId, now) {
      const changed = await tx.run(
        'update wallets set closed_at = ?, updated_at = ? where user_id = ? and closed_at is null and balance = 0',
        [now.getTime(), now.getTime(), userId],
      );
      return changed === 1;
    },

    async holdOpen(tx, userId) {
      const rows = await tx.all(`select user_id from wallets where user_id = ? and closed_at is null${db.forShare()}`, [userId], { keep: true });
      return rows.length > 0;
    },

    shareBalances: (tx, userIds) => balancesOf(tx, userIds, db.forShare()),

    async holdOpenMany(tx, userIds) {
      const states = new Map<number, 'open' | 'closed'>();
      for (let i = 0; i < userIds.length; i += 500) {
        const part = userIds.slice(i, i + 500);
        const rows = await tx.all<{ user_id: number | string; closed: number | boolean }>(
          `select user_id, closed_at is not null as closed from wallets where user_id in (${part.map(() => '?').join(', ')})${db.forShare()}`,
          part,
        );
        for (const r of rows) states.set(Number(r.user_id), r.closed === true || r.closed === 1 ? 'closed' : 'open');
      }
      return states;
    },

    async read(userId, read = (sql, params) => db.read(sql, params)) {
      // The hottest read of the service: a kept statement on a reader connection.
      const rows = await read<{ balance: string; created_at: number | string; updated_at: number | string }>(
        `select cast(w.balance as text) as balance, w.created_at, w.updated_at
         from wallets w join users u on u.id = w.user_id where w.user_id = ? and u.deleted_at is null`,
        [userId],
      );
      if (rows.length === 0) return null;
      const r = rows[0];
      return { userId, balance: int64(r.balance), createdAt: epochMs(r.created_at), updatedAt: epochMs(r.updated_at) };
    },

    async readWithOwed(userId) {
      // One row per pending service (at least one: the join is a left join), each with the wallet and the unpaid total.
      const rows = await db.read<{ balance: string; created_at: number | string; updated_at: number | string } & UnpaidColumns & PendingColumns>(WITH_OWED_SQL, [userId]);
      if (rows.length === 0) return null;
      const r = rows[0];
      return {
        wallet: { userId, balance: int64(r.balance), createdAt: epochMs(r.created_at), updatedAt: epochMs(r.updated_at) },
        pending: pendingOf(rows),
        unpaid: unpaidOf(r),
      };
    },

    async transaction(tx, id) {
      const [row] = await tx.all<LedgerRow>(`select ${LEDGER_COLUMNS} from wallet_transactions where id = ?`, [id], { keep: true });
      return toTransaction(row);
    },

    async wallet(tx, userId) {
      return tx.em.findOneOrFail(Wallet, { userId });
    },

    async list(em, userId, page) {
      const rows = await em.find(WalletTransaction, { userId, id: { $gt: page.afterId } }, { orderBy: { id: 'asc' }, limit: page.limit });
      return pageOf(rows, page);
    },
  };
}
