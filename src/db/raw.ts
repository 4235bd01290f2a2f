/**
 * Raw statements on the connection that holds a transaction, for the bulk hot
 * paths (ingestion, batched charges). Going through knex costs about a
 * microsecond per bound parameter, which dominates statements with thousands
 * of them; here SQLite statements are prepared once per transaction and
 * reused, and PostgreSQL gets named prepared statements for the reused ones.
 * Same connection, same transaction: nothing else changes.
 */
import type { EntityManager } from '@mikro-orm/knex';
import { isPostgres } from './platform';

interface SqliteStatement {
  run(params: unknown[], cb: (this: { changes: number }, err: Error | null) => void): void;
  all(params: unknown[], cb: (err: Error | null, rows: unknown[]) => void): void;
  finalize(cb?: () => void): void;
}
interface SqliteConnection {
  prepare(sql: string, cb?: (err: Error | null) => void): SqliteStatement;
}
interface PgConnection {
  query(q: { name?: string; text: string; values: unknown[] }): Promise<{ rowCount: number | null; rows: unknown[] }>;
}

export interface RawOptions {
  /**
   * Keep the statement prepared: `true` until close() (the statements of one
   * bulk job), 'connection' for as long as the connection lives (the few
   * statements of a hot RPC path).
   */
  reuse?: boolean | 'connection';
}

export interface RawSql {
  /** Runs `sql` (`?` placeholders) and returns how many rows it changed. */
  run(sql: string, params: unknown[], opts?: RawOptions): Promise<number>;
  /** Runs `sql` and returns its rows (RETURNING rows for writes). */
  all<T>(sql: string, params: unknown[], opts?: RawOptions): Promise<T[]>;
  /** Releases the statements prepared with `reuse: true`; call before the transaction ends. */
  close(): Promise<void>;
}

/** Statements kept for the life of a connection (reuse: 'connection'). */
const perConnection = new WeakMap<object, Map<string, SqliteStatement>>();
const pgNames = new Map<string, string>();

function toPg(sql: string): string {
  let n = 0;
  return sql.replace(/\?/g, () => `$${++n}`);
}

function onConnection(conn: unknown, pg: boolean): RawSql {
  if (pg) {
    const client = conn as PgConnection;
    const query = (sql: string, values: unknown[], reuse: RawOptions['reuse']) => {
      let name = pgNames.get(sql);
      if (reuse && !name) pgNames.set(sql, (name = `billing_raw_${pgNames.size}`));
      return client.query({ name: reuse ? name : undefined, text: toPg(sql), values });
    };
    return {
      run: async (sql, params, opts) => (await query(sql, params, opts?.reuse)).rowCount ?? 0,
      all: async <T>(sql: string, params: unknown[], opts?: RawOptions) => (await query(sql, params, opts?.reuse)).rows as T[],
      close: async () => undefined,
    };
  }
  const db = conn as SqliteConnection;
  let kept = perConnection.get(db);
  if (!kept) perConnection.set(db, (kept = new Map()));
  const forConnection = kept;
  const cached = new Map<string, SqliteStatement>();
  const prepare = (sql: string): Promise<SqliteStatement> =>
    new Promise((resolve, reject) => {
      const stmt = db.prepare(sql, (err) => (err ? reject(err) : resolve(stmt)));
    });
  const finalize = (stmt: SqliteStatement) => new Promise<void>((resolve) => stmt.finalize(() => resolve()));
  async function withStatement<T>(sql: string, reuse: RawOptions['reuse'], use: (stmt: SqliteStatement) => Promise<T>): Promise<T> {
    let stmt = forConnection.get(sql) ?? cached.get(sql);
    if (stmt) return use(stmt);
    stmt = await prepare(sql);
    if (reuse === 'connection') forConnection.set(sql, stmt);
    else if (reuse) cached.set(sql, stmt);
    if (reuse) return use(stmt);
    try {
      return await use(stmt);
    } finally {
      await finalize(stmt);
    }
  }
  return {
    run: (sql, params, opts) =>
      withStatement(
        sql,
        opts?.reuse,
        (stmt) =>
          new Promise<number>((resolve, reject) =>
            stmt.run(params, function (err) {
              if (err) reject(err);
              else resolve(this.changes);
            }),
          ),
      ),
    all: <T>(sql: string, params: unknown[], opts?: RawOptions) =>
      withStatement(sql, opts?.reuse, (stmt) => new Promise<T[]>((resolve, reject) => stmt.all(params, (err, rows) => (err ? reject(err) : resolve(rows as T[]))))),
    async close() {
      const all = [...cached.values()];
      cached.clear();
      await Promise.all(all.map(finalize));
    },
  };
}

/**
 * Statements on `tx`'s own connection (tx must be inside em.transactional).
 * Without `reuse` a statement is prepared, run and released.
 */
export async function rawSql(tx: EntityManager): Promise<RawSql> {
  const trx = tx.getTransactionContext() as { client: { acquireConnection(): Promise<unknown> } } | undefined;
  if (!trx) throw new Error('rawSql needs a transaction');
  // The transaction's client always hands out the transaction's connection (knex makeTxClient).
  return onConnection(await trx.client.acquireConnection(), isPostgres(tx));
}

// ---------------------------------------------------------------------------
// SQLite readers
// ---------------------------------------------------------------------------

interface SqliteDriver {
  OPEN_READONLY: number;
  Database: new (file: string, mode: number, cb: (err: Error | null) => void) => SqliteConnection & {
    exec(sql: string, cb: (err: Error | null) => void): void;
    close(cb: (err: Error | null) => void): void;
  };
}

export interface SqliteReaders {
  next(): SqliteConnection;
  close(): Promise<void>;
}

/** Read-only connections of an ORM's SQLite database, keyed by its (fork-shared) Connection object. */
const readersOf = new WeakMap<object, SqliteReaders>();

/**
 * Opens `count` read-only connections to the SQLite file behind `em` for
 * rawRead. SQLite in WAL mode runs any number of readers beside its one
 * writer, each seeing the last committed state; the ORM's single pooled
 * connection stays the writer. Call close() before closing the ORM.
 */
export async function openSqliteReaders(em: EntityManager, file: string, count: number, pragmas: string): Promise<SqliteReaders> {
  // The driver knex already loaded (the sqlite3 package under @mikro-orm/sqlite).
  const driver = (em.getConnection().getKnex().client as { driver: SqliteDriver }).driver;
  const open = () =>
    new Promise<InstanceType<SqliteDriver['Database']>>((resolve, reject) => {
      const db = new driver.Database(file, driver.OPEN_READONLY, (err) => {
        if (err) return reject(err);
        db.exec(pragmas, (e) => (e ? reject(e) : resolve(db)));
      });
    });
  const all = await Promise.all(Array.from({ length: count }, open));
  let turn = 0;
  const readers: SqliteReaders = {
    next: () => all[turn++ % all.length],
    async close() {
      readersOf.delete(em.getConnection());
      await Promise.all(all.map((db) => new Promise<void>((resolve) => db.close(() => resolve()))));
    },
  };
  readersOf.set(em.getConnection(), readers);
  return readers;
}

/**
 * One read, prepared once per connection: on a SQLite reader when there are
 * some (outside a transaction), else on a pooled connection, or on the
 * transaction's inside one. For the hot read paths: no query building, no
 * parameter inlining, no entity hydration. Reads committed data only.
 */
export async function rawRead<T>(em: EntityManager, sql: string, params: unknown[]): Promise<T[]> {
  if (em.getTransactionContext()) return (await rawSql(em)).all<T>(sql, params, { reuse: 'connection' });
  const readers = readersOf.get(em.getConnection());
  if (readers) return onConnection(readers.next(), false).all<T>(sql, params, { reuse: 'connection' });
  const client = em.getConnection().getKnex().client as { acquireConnection(): Promise<unknown>; releaseConnection(c: unknown): unknown };
  const conn = await client.acquireConnection();
  try {
    return await onConnection(conn, isPostgres(em)).all<T>(sql, params, { reuse: 'connection' });
  } finally {
    client.releaseConnection(conn);
  }
}
