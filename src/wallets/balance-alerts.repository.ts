/**
 * The door of the `balance_alerts` table: per user, an own low-balance
 * threshold (null: the deployment's LOW_BALANCE_THRESHOLD) and the alert
 * state last written, so that each crossing writes its events once. A user
 * without a row is OK (users created before the table existed).
 */
import type { Database, Read, Tx } from '../db/database';
import { int64 } from '../db/types';
import type { AlertState } from './balance-alert-rule';

export interface AlertRow {
  userId: number;
  /** The user's own threshold in micros; null: the deployment's. */
  threshold: bigint | null;
  state: AlertState;
}

export interface BalanceAlertsRepository {
  /** The row of a new user, in the state their balance gives (no crossing, no event). */
  open(tx: Tx, userId: number, state: AlertState, now: Date): Promise<void>;
  /**
   * The rows of `userIds` (live users), created OK where missing, locked
   * until `tx` ends (PostgreSQL), in user order.
   */
  lock(tx: Tx, userIds: readonly number[], now: Date): Promise<Map<number, AlertRow>>;
  /** Sets (null: drops) the user's own threshold; the row is created OK if missing, and locked. */
  setThreshold(tx: Tx, userId: number, threshold: bigint | null, now: Date): Promise<void>;
  /** Records the new state of rows locked in `tx`. */
  moveState(tx: Tx, userId: number, state: AlertState, now: Date): Promise<void>;
  /** The user's row as committed; null without one. */
  read(userId: number, read?: Read): Promise<AlertRow | null>;
}

type Row = { user_id: number | string; threshold: string | null; state: AlertState };

const toRow = (r: Row): AlertRow => ({ userId: Number(r.user_id), threshold: r.threshold === null ? null : int64(r.threshold), state: r.state });

export function createBalanceAlertsRepository(db: Database): BalanceAlertsRepository {
  async function select(tx: Tx, ids: readonly number[]): Promise<Row[]> {
    return tx.all<Row>(
      `select user_id, cast(threshold as text) as threshold, state from balance_alerts
       where user_id in (${ids.map(() => '?').join(', ')}) order by user_id${db.forUpdate()}`,
      [...ids],
      { keep: ids.length === 1 },
    );
  }

  return {
    async open(tx, userId, state, now) {
      await tx.run(`insert into balance_alerts (user_id, threshold, state, updated_at) values (?, null, ?, ?)`, [userId, state, now.getTime()]);
    },

    async lock(tx, userIds, now) {
      const rows = new Map<number, AlertRow>();
      const sorted = [...new Set(userIds)].sort((a, b) => a - b);
      for (let i = 0; i < sorted.length; i += 500) {
        const part = sorted.slice(i, i + 500);
        for (const r of await select(tx, part)) rows.set(Number(r.user_id), toRow(r));
        const missing = part.filter((id) => !rows.has(id));
        if (missing.length === 0) continue;
        // Created by whichever transaction comes first; the others wait for it and lock the row it made.
        await tx.run(
          `insert into balance_alerts (user_id, threshold, state, updated_at) values ${missing.map(() => `(?, null, 'OK', ?)`).join(', ')}
           on conflict (user_id) do nothing`,
          missing.flatMap((id) => [id, now.getTime()]),
        );
        for (const r of await select(tx, missing)) rows.set(Number(r.user_id), toRow(r));
      }
      return rows;
    },

    async setThreshold(tx, userId, threshold, now) {
      const value = threshold === null ? null : threshold.toString();
      await tx.run(
        `insert into balance_alerts (user_id, threshold, state, updated_at) values (?, cast(? as bigint), 'OK', ?)
         on conflict (user_id) do update set threshold = excluded.threshold, updated_at = excluded.updated_at`,
        [userId, value, now.getTime()],
      );
    },

    async moveState(tx, userId, state, now) {
      await tx.run(`update balance_alerts set state = ?, updated_at = ? where user_id = ?`, [state, now.getTime(), userId], { keep: true });
    },

    async read(userId, read = (sql, params) => db.read(sql, params)) {
      const rows = await read<Row>(`select user_id, cast(threshold as text) as threshold, state from balance_alerts where user_id = ?`, [userId]);
      return rows.length === 0 ? null : toRow(rows[0]);
    },
  };
}
