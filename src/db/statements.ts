/**
 * Statements on one connection, bypassing the query builder: for the bulk and
 * hot paths, where knex's per-parameter cost dominates statements with
 * thousands of parameters. Kept statements stay prepared in a cache that the
 * engine holds for that connection (owned by the database object, never by
 * this module); the others are prepared for one use.
 */

/** Statements on one connection (the transaction's, or a reader). */
export interface Statements {
  run(sql: string, params: unknown[], keep: boolean): Promise<number>;
  all<T>(sql: string, params: unknown[], keep: boolean): Promise<T[]>;
}

// ---- better-sqlite3 ------------------------------------------------------------

/** What the engine uses of a better-sqlite3 statement and connection. */
export interface SqliteStatement {
  readonly reader: boolean;
  run(...params: unknown[]): { changes: number };
  all(...params: unknown[]): unknown[];
}

export interface SqliteConnection {
  prepare(sql: string): SqliteStatement;
}

/** better-sqlite3 binds numbers, strings, bigints, buffers and null; a boolean is bound as 1 or 0. */
const bindable = (params: unknown[]): unknown[] => (params.some((p) => typeof p === 'boolean') ? params.map((p) => (typeof p === 'boolean' ? Number(p) : p)) : params);

/**
 * Statements on a better-sqlite3 connection (synchronous: each call runs to
 * its end before it returns); `kept` is that connection's cache of kept
 * statements. A statement that is not kept is simply dropped after use.
 */
export function sqliteStatements(db: SqliteConnection, kept: Map<string, SqliteStatement>): Statements {
  const statement = (sql: string, keep: boolean): SqliteStatement => {
    let stmt = kept.get(sql);
    if (!stmt) {
      stmt = db.prepare(sql);
      if (keep) kept.set(sql, stmt);
    }
    return stmt;
  };
  return {
    run: async (sql, params, keep) => statement(sql, keep).run(...bindable(params)).changes,
    all: async <T>(sql: string, params: unknown[], keep: boolean) => statement(sql, keep).all(...bindable(params)) as T[],
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
  };
}
