/**
 * The database object. Built once at start-up (openDatabase) and passed to
 * every repository through its factory; nothing about the database lives in
 * module state. It owns:
 * - the ORM (MikroORM 6) and its root entity manager, forked per unit of work;
 * - the connections: on SQLite the ORM's single writer plus read-only readers
 *   for committed reads; on PostgreSQL the pool;
 * - the prepared-statement caches of those connections;
 * - group commit (SQLite: short writes that arrive together share a COMMIT);
 * - the dialect: every SQL difference between SQLite and PostgreSQL is a
 *   named method here (row locks, id allocation, serializing ingestion), so
 *   domain code never asks which database it runs on.
 */
import { helper } from '@mikro-orm/core';
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import type { DatabaseConfig } from '../config';
import { openEngine, type Engine } from './engine';
import { GroupCommit } from './group-commit';
import type { Statements } from './statements';

export type Dialect = DatabaseConfig['kind'];

/** Options for a statement run through a Tx or Database.read. */
export interface StatementOptions {
  /**
   * Keep the statement prepared on its connection for later calls (the few
   * fixed statements of hot paths). Without it a statement is prepared for
   * one use: right for SQL whose text varies (lists of placeholders).
   */
  keep?: boolean;
}

/** A write transaction: its unit of work, and statements on its own connection. */
export interface Tx {
  /** The transaction's unit of work (MikroORM entity manager). */
  readonly em: EntityManager;
  /** Runs `sql` (`?` placeholders) and returns how many rows it changed. */
  run(sql: string, params: unknown[], opts?: StatementOptions): Promise<number>;
  /** Runs `sql` and returns its rows (RETURNING rows for writes). */
  all<T>(sql: string, params: unknown[], opts?: StatementOptions): Promise<T[]>;
}

/** A read of committed data: the rows of `sql` (a kept statement). */
export type Read = <T>(sql: string, params: unknown[]) => Promise<T[]>;

/** Reads in a write transaction, as a Read (kept statements on the transaction's connection). */
export const readIn = (tx: Tx): Read => (sql, params) => tx.all(sql, params, { keep: true });

export interface TransactionOptions {
  /** Refuse to start (AbortError) when the caller has gone away. */
  signal?: AbortSignal;
  /**
   * groupWrite only: begin after `after` has settled, so that writes a caller
   * made in sequence (the batches of one stream) apply in that order. On SQLite
   * the group-commit queue already runs writes in the order they were submitted;
   * on PostgreSQL, where each write is its own transaction, this waits.
   */
  after?: Promise<unknown>;
}

export interface Database {
  readonly dialect: Dialect;
  /** The root entity manager. Never used directly: fork it for a unit of work. */
  readonly em: EntityManager;
  /** A new unit of work for reads (em.find) outside any transaction. */
  fork(): EntityManager;
  /** Runs `work` in one write transaction: all of it commits, or none of it. */
  transaction<T>(work: (tx: Tx) => Promise<T>, opts?: TransactionOptions): Promise<T>;
  /**
   * Runs a short write in a transaction that, on SQLite, other short writes
   * arriving at the same moment may share (one COMMIT, one fsync, each write
   * in its own savepoint; nobody is answered before the COMMIT). `work` must
   * only write through `tx` and must not start transactions of its own.
   */
  groupWrite<T>(work: (tx: Tx) => Promise<T>, opts?: TransactionOptions): Promise<T>;
  /**
   * Rows of a read of committed data outside any transaction: on SQLite from a
   * read-only connection beside the writer (never waiting for it), else from
   * the pool. Prepared once per connection: for the fixed reads of hot paths.
   */
  read<T>(sql: string, params: unknown[]): Promise<T[]>;
  /**
   * Runs `work`, whose reads through the `read` it gets all see one snapshot
   * of committed data (reads that must agree, e.g. a balance and what is owed
   * against it): on PostgreSQL one REPEATABLE READ, READ ONLY transaction; on
   * SQLite one read transaction on a reader kept for snapshots.
   */
  snapshot<T>(work: (read: Read) => Promise<T>): Promise<T>;
  /**
   * Write transactions this object has committed so far (a shared group-commit
   * transaction counts once, however many writes it held): on SQLite, how
   * many COMMITs, hence fsyncs, its writes cost.
   */
  committedTransactions(): number;

  // ---- the dialect, by name -------------------------------------------------

  /** ` for update` on PostgreSQL (lock the rows read until the transaction ends); '' on SQLite (one writer). */
  forUpdate(): string;
  /** ` for update skip locked` on PostgreSQL (rows another replica holds are skipped); '' on SQLite. */
  forUpdateSkipLocked(): string;
  /** ` for share [of alias]` on PostgreSQL; '' on SQLite. */
  forShare(alias?: string): string;
  /**
   * `n` new ids for `table` (an autoincrement/identity id), for rows inserted
   * with explicit ids in this transaction: the sequence on PostgreSQL; on
   * SQLite, past the largest id ever used (this transaction is the only writer).
   */
  allocateIds(tx: Tx, table: string, n: number): Promise<number[]>;
  /**
   * PostgreSQL: transaction-scoped advisory locks on user ids (in id order), `shared` by writers of usage for
   * users they found unknown, `exclusive` by the creation of a user, so that the two never pass each other
   * unseen; true. SQLite (one writer, nothing to pass): nothing, false.
   */
  lockUsers(tx: Tx, userIds: readonly number[], mode: 'shared' | 'exclusive'): Promise<boolean>;
  /**
   * Runs `work` while no other work of the same `name` runs: in this process,
   * and on PostgreSQL in any replica (a session-level advisory lock held on a
   * connection of its own for the whole of `work`, across its transactions;
   * released if the process dies).
   */
  exclusive<T>(name: 'ingestion', work: () => Promise<T>): Promise<T>;
  /**
   * Runs `write` (an insert of event rows) so that event ids become visible
   * in id order. On SQLite at once (one writer: ids are taken in commit
   * order). On PostgreSQL at the end of `tx`, after its other work, under a
   * transaction-scoped advisory lock held until commit: a transaction that
   * took a smaller id has committed before another can take a larger one,
   * and the lock is held only for the insert and the COMMIT (taken earlier,
   * it could wait in a cycle with the row locks taken after it). Only the
   * events' door calls it.
   */
  inEventOrder(tx: Tx, write: () => Promise<void>): Promise<void>;
  /**
   * For long work done in a series of short transactions (ingestion): should
   * the transaction begun at `startedMs` (performance.now()) commit now so
   * that other writes go in? On SQLite, as soon as another write waits for
   * the one writer (after a few ms of work, so commits stay few); else after
   * a long while. On PostgreSQL (row locks) every quarter second.
   */
  chunkDue(startedMs: number): boolean;

  /** Closes readers, the group-commit queue and the ORM. */
  close(force?: boolean): Promise<void>;
}

export interface OpenDatabaseOptions {
  /**
   * Apply pending migrations (default true). Tools that inspect a database
   * they do not own (the invariant checker) pass false and check the schema;
   * then a missing PostgreSQL database is not created either.
   */
  migrate?: boolean;
  /**
   * SQLite: a counter in shared memory that every thread opening the same file
   * gets (Int32Array over a SharedArrayBuffer): how many writer connections wait
   * for the write lock, so that a long chunked write (ingestion) lets them in.
   */
  lockWaiters?: Int32Array;
}

/** pg_advisory_lock keys of `exclusive` work. */
const EXCLUSIVE_KEYS = { ingestion: 72010001 } as const;
/** The first key of lockUsers' two-key advisory locks (the second is the user id, folded into int4). */
const USER_LOCK_SPACE = 72010003;
/** The pg_advisory_xact_lock key that orders event ids. */
const EVENT_ORDER_KEY = 72010004;

/** chunkDue: least work before letting a waiting writer in, and most without one (SQLite); PostgreSQL's chunk. */
const CHUNK_MIN_MS = 10;
const CHUNK_MAX_MS = 5000;
const PG_CHUNK_MS = 250;

/**
 * SQLite: the most statement work a write transaction does on the event loop
 * before it lets a turn of the loop run. better-sqlite3 answers synchronously,
 * so without a turn a transaction (a group of 256 writes, a batch of 1,000
 * usage events, the seal of an ingestion run) runs to its COMMIT in
 * microtasks and no call is read from the network meanwhile: a GetBalance
 * beside 4 streams of usage waited 200-320 ms. Reads use their own
 * connections, so they are answered during the turn; other writes wait for
 * the writer as before.
 */
const SLICE_MS = 4;

/** True when `em`'s unit of work holds a change not yet written: an entity persisted, removed or changed in place. */
export function unflushed(em: EntityManager): boolean {
  const uow = em.getUnitOfWork(false);
  if (uow.getPersistStack().size > 0 || uow.getRemoveStack().size > 0) return true;
  for (const entity of uow.getIdentityMap()) {
    if (helper(entity).__initialized && helper(entity).isTouched()) return true;
  }
  return false;
}
const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

class SqlDatabase implements Database {
  readonly dialect: Dialect;
  readonly em: EntityManager;
  /** Per open transaction, the writes deferred to its end (see inEventOrder); gone with the Tx. */
  private readonly beforeCommit = new WeakMap<Tx, (() => Promise<void>)[]>();
  private readonly groups: GroupCommit | null;
  /** The tail of the work each `exclusive` name runs in this process. */
  private readonly exclusives = new Map<string, Promise<unknown>>();
  private committed = 0;

  constructor(private readonly engine: Engine) {
    this.dialect = engine.dialect;
    this.em = engine.em;
    // PostgreSQL has real row locks and many connections: each write is its own transaction there.
    this.groups = engine.dialect === 'sqlite' ? new GroupCommit((work) => this.transaction(work)) : null;
  }

  fork(): EntityManager {
    return this.em.fork();
  }

  async transaction<T>(work: (tx: Tx) => Promise<T>, opts: TransactionOptions = {}): Promise<T> {
    opts.signal?.throwIfAborted();
    // The connection's own transaction, not em.transactional: MikroORM runs that (and every flush) inside an
    // AsyncLocalStorage, and on Node 20 one AsyncLocalStorage.run installs promise hooks for the rest of the
    // process: every promise of every call then pays for them (GetBalance: 13% fewer calls/s). The repositories
    // write through SQL and the ORM's native insert/update, which need no flush (see unflushed).
    const em = this.em.fork();
    const result = await em.getConnection().transactional(async (trx) => {
      em.setTransactionContext(trx);
      try {
        const tx = txOf(em, await this.engine.statementsOf(em), this.dialect === 'sqlite' ? slicer() : noSlices);
        const hooks: (() => Promise<void>)[] = [];
        this.beforeCommit.set(tx, hooks);
        const value = await work(tx);
        // Writes deferred to the end of the transaction (inEventOrder), in the order they were asked for.
        for (const hook of hooks) await hook();
        // A change made to a managed entity still gets written (the slow path, with the ORM's flush).
        if (unflushed(em)) await em.flush();
        return value;
      } finally {
        em.resetTransactionContext();
      }
    });
    this.committed++;
    return result;
  }

  committedTransactions(): number {
    return this.committed;
  }

  groupWrite<T>(work: (tx: Tx) => Promise<T>, opts: TransactionOptions = {}): Promise<T> {
    if (!this.groups) {
      if (!opts.after) return this.transaction(work, opts);
      const start = () => this.transaction(work, opts);
      return opts.after.then(start, start);
    }
    return this.groups.submit(work, opts.signal);
  }

  read<T>(sql: string, params: unknown[]): Promise<T[]> {
    return this.engine.read<T>(sql, params);
  }

  snapshot<T>(work: (read: Read) => Promise<T>): Promise<T> {
    return this.engine.snapshot(work);
  }

  forUpdate(): string {
    return this.dialect === 'postgresql' ? ' for update' : '';
  }

  forUpdateSkipLocked(): string {
    return this.dialect === 'postgresql' ? ' for update skip locked' : '';
  }

  forShare(alias?: string): string {
    return this.dialect === 'postgresql' ? ` for share${alias ? ` of ${alias}` : ''}` : '';
  }

  async allocateIds(tx: Tx, table: string, n: number): Promise<number[]> {
    if (n === 0) return [];
    if (this.dialect === 'postgresql') {
      const rows = await tx.all<{ id: number | string }>(
        `select nextval(pg_get_serial_sequence('${table}', 'id')) as id from generate_series(1, ?)`,
        [n],
      );
      return rows.map((r) => Number(r.id));
    }
    const [{ m, s }] = await tx.all<{ m: number | string | null; s: number | string | null }>(
      `select (select max(id) from ${table}) as m, (select seq from sqlite_sequence where name = '${table}') as s`,
      [],
    );
    // Past the largest id ever used (AUTOINCREMENT never reuses one); inserting them moves sqlite_sequence on.
    const first = Math.max(Number(m ?? 0), Number(s ?? 0)) + 1;
    return Array.from({ length: n }, (_, i) => first + i);
  }

  async lockUsers(tx: Tx, userIds: readonly number[], mode: 'shared' | 'exclusive'): Promise<boolean> {
    if (this.dialect !== 'postgresql') return false;
    const fn = mode === 'shared' ? 'pg_advisory_xact_lock_shared' : 'pg_advisory_xact_lock';
    // Folded ids that collide only make one wait for the other: never wrong.
    const keys = [...new Set(userIds.map((id) => id % 2147483647))].sort((a, b) => a - b);
    for (const key of keys) await tx.all(`select ${fn}(${USER_LOCK_SPACE}, ?::int)`, [key], { keep: true });
    return true;
  }

  exclusive<T>(name: 'ingestion', work: () => Promise<T>): Promise<T> {
    const before = this.exclusives.get(name) ?? Promise.resolve();
    const run = before.then(
      () => this.engine.withSessionLock(EXCLUSIVE_KEYS[name], work),
      () => this.engine.withSessionLock(EXCLUSIVE_KEYS[name], work),
    );
    this.exclusives.set(
      name,
      run.catch(() => undefined),
    );
    return run;
  }

  async inEventOrder(tx: Tx, write: () => Promise<void>): Promise<void> {
    if (this.dialect !== 'postgresql') return write();
    const hooks = this.beforeCommit.get(tx);
    if (!hooks) throw new Error('inEventOrder: not a transaction of this database');
    hooks.push(async () => {
      await tx.all(`select pg_advisory_xact_lock(${EVENT_ORDER_KEY})`, [], { keep: true });
      await write();
    });
  }

  chunkDue(startedMs: number): boolean {
    const elapsed = performance.now() - startedMs;
    if (this.dialect === 'postgresql') return elapsed >= PG_CHUNK_MS;
    return elapsed >= CHUNK_MAX_MS || (elapsed >= CHUNK_MIN_MS && this.engine.writersWaiting());
  }

  async close(force?: boolean): Promise<void> {
    await this.groups?.close();
    await this.engine.close(force);
  }
}

/** PostgreSQL's statements wait for the network: the event loop turns meanwhile. */
const noSlices = async (): Promise<void> => undefined;

/** After a statement: a turn of the event loop once SLICE_MS of work have run since the last one. */
function slicer(): () => Promise<void> {
  let since = performance.now();
  return async () => {
    if (performance.now() - since < SLICE_MS) return;
    await turn();
    since = performance.now();
  };
}

function txOf(em: EntityManager, statements: Statements, slice: () => Promise<void>): Tx {
  return {
    em,
    async run(sql, params, opts) {
      const changed = await statements.run(sql, params, opts?.keep ?? false);
      await slice();
      return changed;
    },
    async all<T>(sql: string, params: unknown[], opts?: StatementOptions) {
      const rows = await statements.all<T>(sql, params, opts?.keep ?? false);
      await slice();
      return rows;
    },
  };
}

/** Connects (and migrates, unless told not to) the configured database. */
export async function openDatabase(config: DatabaseConfig, log: Logger, opts: OpenDatabaseOptions = {}): Promise<Database> {
  return new SqlDatabase(await openEngine(config, log, opts));
}
