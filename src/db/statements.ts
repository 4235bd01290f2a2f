/**
 * Statements on one connection, bypassing the query builder: for the bulk and
 * hot paths, where knex's per-parameter cost dominates statements with
 * thousands of parameters. Kept statements stay prepared in a cache that the
 * engine holds for that connection (owned by the database object, never by
 * this module); the others are prepared, run and released.
 */

/** Statements on one connection (the transaction's, or a reader). */
export interface Statements {
  run(sql: string, params: unknown[], keep: boolean): Promise<number>;
  all<T>(sql: string, params: unknown[], keep: boolean): Promise<T[]>;
  /** Releases what this handle prepared without keeping (nothing is pending after a call returns). */
  release(): Promise<void>;
}

// ---- node-sqlite3 -------------------------------------------------------------

export interface SqliteStatement {
  run(params: unknown[], cb: (this: { changes: number }, err: Error | null) => void): void;
  all(params: unknown[], cb: (err: Error | null, rows: unknown[]) => void): void;
  finalize(cb?: () => void): void;
}

export interface SqliteConnection {
  prepare(sql: string, cb?: (err: Error | null) => void): SqliteStatement;
}

/** Statements on a node-sqlite3 connection; `kept` is that connection's cache of kept statements. */
export function sqliteStatements(db: SqliteConnection, kept: Map<string, SqliteStatement>): Statements {
  const prepare = (sql: string): Promise<SqliteStatement> =>
    new Promise((resolve, reject) => {
      const stmt = db.prepare(sql, (err) => (err ? reject(err) : resolve(stmt)));
    });
  const finalize = (stmt: SqliteStatement) => new Promise<void>((resolve) => stmt.finalize(() => resolve()));
  async function use<T>(sql: string, keep: boolean, fn: (stmt: SqliteStatement) => Promise<T>): Promise<T> {
    const cached = kept.get(sql);
    const stmt = cached ?? (await prepare(sql));
    if (!cached && keep) kept.set(sql, stmt);
    if (!keep && !cached) {
      try {
        return await fn(stmt);
      } finally {
        await finalize(stmt);
      }
    }
    try {
      return await fn(stmt);
    } catch (err) {
      // A statement that failed (SQLITE_BUSY, say) may be left "in progress", which blocks savepoints and
      // COMMIT on its connection: drop it, and prepare it afresh next time.
      kept.delete(sql);
      await finalize(stmt);
      throw err;
    }
  }
  return {
    run: (sql, params, keep) =>
      use(
        sql,
        keep,
        (stmt) =>
          new Promise<number>((resolve, reject) =>
            stmt.run(params, function (err) {
              if (err) reject(err);
              else resolve(this.changes);
            }),
          ),
      ),
    all: <T>(sql: string, params: unknown[], keep: boolean) =>
      use(sql, keep, (stmt) => new Promise<T[]>((resolve, reject) => stmt.all(params, (err, rows) => (err ? reject(err) : resolve(rows as T[]))))),
    release: async () => undefined,
  };
}

// ---- PostgreSQL (pg) ----------------------------------------------------------

export interface PgConnection {
  query(q: { name?: string; text: string; values: unknown[] }): Promise<{ rowCount: number | null; rows: unknown[] }>;
}

function toPg(sql: string): string {
  let n = 0;
  return sql.replace(/\?/g, () => `$${++n}`);
}

/**
 * Statements on a pg connection: a kept statement is a named prepared
 * statement (pg prepares it once per connection); `names` maps SQL text to
 * its name and is the engine's, shared by all its connections.
 */
export function pgStatements(client: PgConnection, names: Map<string, string>): Statements {
  const query = (sql: string, values: unknown[], keep: boolean) => {
    let name = names.get(sql);
    if (keep && !name) names.set(sql, (name = `billing_${names.size}`));
    return client.query({ name: keep ? name : undefined, text: toPg(sql), values });
  };
  return {
    run: async (sql, params, keep) => (await query(sql, params, keep)).rowCount ?? 0,
    all: async <T>(sql: string, params: unknown[], keep: boolean) => (await query(sql, params, keep)).rows as T[],
    release: async () => undefined,
  };
}
