/**
 * The door of the `events` and `event_retention` tables: the outbox of the
 * event stream. Every event is appended in the transaction of the change it
 * describes, by that change's owner, so there is never an event without its
 * change nor a change without its event.
 *
 * Cursors (ids) become visible in id order: rows are inserted through
 * db.inEventOrder (SQLite: at once, one writer; PostgreSQL: at the end of
 * the transaction under a lock held until COMMIT), so a transaction that got
 * a smaller id has committed before any other gets a larger one, and a
 * reader that saw id N never sees an id below N appear later.
 */
import type { Database, Read, Tx } from '../db/database';
import { epochMs } from '../db/types';
import type { EventType, NewEvent, StoredEvent } from './events.types';

export interface EventFilter {
  /** Events with a larger id than this. */
  afterId: number;
  /** Only these types; empty or absent: all. */
  types?: readonly EventType[];
  /** Only this user's events; 0 or absent: all. */
  userId?: number;
}

export interface Retention {
  /** Every event up to this id has been deleted (0: none yet). A cursor below it is expired. */
  prunedThrough: number;
  /** Events created before this instant have been deleted. */
  prunedBefore: Date;
}

export interface EventsRepository {
  /** Writes `events` in `tx`, all stamped `now`. */
  append(tx: Tx, events: readonly NewEvent[], now: Date): Promise<void>;
  /** Committed events matching `filter`, oldest first, at most `limit`. */
  list(filter: EventFilter, limit: number, read?: Read): Promise<StoredEvent[]>;
  /** The largest id committed (0 when there is none). */
  lastId(read?: Read): Promise<number>;
  /** How far the retention has deleted. */
  retention(read?: Read): Promise<Retention>;
  /**
   * Deletes the events created before `before`, oldest first, in transactions
   * of at most `batch` events, and moves the retention mark; returns how many.
   */
  prune(before: Date, batch?: number): Promise<number>;
}

type EventRow = { id: number | string; type: string; user_id: number | string; ref_id: number | string | null; payload: string; created_at: number | string };

/** Rows per multi-row INSERT (5 parameters each). */
const INSERT_ROWS = 500;
/** Payload fields that hold money (bigint micros, stored as decimal strings) and instants (epoch ms). */
const MONEY_KEYS = new Set(['amount', 'balanceAfter', 'availableBalance', 'threshold']);
const DATE_KEYS = new Set(['nextAttemptTime']);

export function encodePayload(payload: object): string {
  return JSON.stringify(payload, function (this: Record<string, unknown>, key, value: unknown) {
    const raw = this[key];
    if (typeof raw === 'bigint') return raw.toString();
    if (raw instanceof Date) return raw.getTime();
    return value;
  });
}

export function decodePayload(text: string): NewEvent['payload'] {
  return JSON.parse(text, (key, value: unknown) => {
    if (MONEY_KEYS.has(key) && typeof value === 'string') return BigInt(value);
    if (DATE_KEYS.has(key) && typeof value === 'number') return new Date(value);
    return value;
  }) as NewEvent['payload'];
}

function toEvent(row: EventRow): StoredEvent {
  return {
    id: Number(row.id),
    type: row.type as EventType,
    userId: Number(row.user_id),
    refId: row.ref_id === null ? null : Number(row.ref_id),
    payload: decodePayload(row.payload),
    createdAt: epochMs(row.created_at),
  } as StoredEvent;
}

export function createEventsRepository(db: Database): EventsRepository {
  const committed: Read = (sql, params) => db.read(sql, params);

  return {
    async append(tx, events, now) {
      if (events.length === 0) return;
      const at = now.getTime();
      // Encoded now: the caller may change its objects before a deferred write runs.
      const rows = events.map((e) => [e.type, e.userId, e.refId, encodePayload(e.payload), at]);
      await db.inEventOrder(tx, async () => {
        for (let i = 0; i < rows.length; i += INSERT_ROWS) {
          const part = rows.slice(i, i + INSERT_ROWS);
          const sql = `insert into events (type, user_id, ref_id, payload, created_at) values ${part.map(() => '(?, ?, ?, ?, ?)').join(', ')}`;
          await tx.run(sql, part.flat(), { keep: part.length === 1 || part.length === INSERT_ROWS });
        }
      });
    },

    async list(filter, limit, read = committed) {
      const where = ['id > ?'];
      const params: unknown[] = [filter.afterId];
      if (filter.userId) {
        where.push('user_id = ?');
        params.push(filter.userId);
      }
      if (filter.types && filter.types.length > 0) {
        where.push(`type in (${filter.types.map(() => '?').join(', ')})`);
        params.push(...filter.types);
      }
      params.push(limit);
      const rows = await read<EventRow>(
        `select id, type, user_id, ref_id, payload, created_at from events where ${where.join(' and ')} order by id limit ?`,
        params,
      );
      return rows.map(toEvent);
    },

    async lastId(read = committed) {
      const [row] = await read<{ id: number | string | null }>('select max(id) as id from events', []);
      return Number(row?.id ?? 0);
    },

    async retention(read = committed) {
      const [row] = await read<{ pruned_through: number | string; pruned_before: number | string }>(
        'select pruned_through, pruned_before from event_retention where id = 1',
        [],
      );
      return { prunedThrough: Number(row.pruned_through), prunedBefore: epochMs(row.pruned_before) };
    },

    async prune(before, batch = 5000) {
      let deleted = 0;
      for (;;) {
        const n = await db.transaction(async (tx) => {
          // Oldest first by id, up to the first event not old enough: the mark stays a prefix of the ids.
          const rows = await tx.all<{ id: number | string; created_at: number | string }>(
            'select id, created_at from events order by id limit ?',
            [batch],
          );
          let through = 0;
          for (const r of rows) {
            if (Number(r.created_at) >= before.getTime()) break;
            through = Number(r.id);
          }
          if (through === 0) return 0;
          const removed = await tx.run('delete from events where id <= ?', [through]);
          await tx.run('update event_retention set pruned_through = ?, pruned_before = ? where id = 1 and pruned_through < ?', [
            through,
            before.getTime(),
            through,
          ]);
          return removed;
        });
        deleted += n;
        if (n < batch) return deleted;
      }
    },
  };
}
