/**
 * The engines under the database object: MikroORM on SQLite or PostgreSQL,
 * connected, configured and migrated, with their raw connections. Only
 * database.ts uses this; everything it returns belongs to one Engine object.
 */
import { MikroORM as SqliteORM, defineConfig as defineSqlite } from '@mikro-orm/better-sqlite';
import type { EntityManager } from '@mikro-orm/knex';
import { Migrator } from '@mikro-orm/migrations';
import { Client as PgClient, types as pgTypes } from 'pg';
import type { Logger } from 'pino';
import { sqliteInMemory, type DatabaseConfig } from '../config';
import { entities } from './entities';
import { migrationsList } from './migrations';
import { pgStatements, sqliteStatements, type PgConnection, type SqliteConnection, type SqliteStatement, type Statements } from './statements';

export interface Engine {
  readonly dialect: DatabaseConfig['kind'];
  /** The ORM's root entity manager. */
  readonly em: EntityManager;
  /** Statements on the connection of `em`'s transaction. */
  statementsOf(em: EntityManager): Promise<Statements>;
  /** A committed read outside any transaction (SQLite: on a reader), with a kept statement. */
  read<T>(sql: string, params: unknown[]): Promise<T[]>;
  /** Runs `work`, whose reads (kept statements) all see one snapshot of committed data. */
  snapshot<T>(work: (read: <R>(sql: string, params: unknown[]) => Promise<R[]>) => Promise<T>): Promise<T>;
  /** Runs `fn` holding a PostgreSQL session advisory lock (on SQLite, one process owns the file: just runs it). */
  withSessionLock<T>(key: number, fn: () => Promise<T>): Promise<T>;
  /** True when work waits for the (SQLite) writer connection, or a writer of another thread for the lock. */
  writersWaiting(): boolean;
  close(force?: boolean): Promise<void>;
}

/**
 * How long a write transaction waits for SQLite's write lock while another
 * process holds it. better-sqlite3 runs on the event loop, so SQLite's own
 * busy handler would block the whole service while it waits; instead a write
 * transaction begins with BEGIN IMMEDIATE, without the busy handler, and
 * retries it with short sleeps (see beginImmediate); other statements wait at
 * most SQLITE_BUSY_STALL_MS.
 */
const SQLITE_LOCK_WAIT_MS = 5000;
const SQLITE_BUSY_STALL_MS = 20;
/** The longest sleep between two tries of BEGIN IMMEDIATE (the usage writer thread's transactions last a few ms). */
const SQLITE_LOCK_POLL_MAX_MS = 4;
/** The longest a writer lets a waiting writer of the other thread take the lock first. */
const SQLITE_HANDOFF_MAX_MS = 20;

/** Applied to every SQLite connection (exported so the benchmark's raw-driver floors use the same settings). */
export const SQLITE_PRAGMAS = [
  'pragma journal_mode = wal',
  `pragma busy_timeout = ${SQLITE_BUSY_STALL_MS}`,
  'pragma foreign_keys = on',
  'pragma synchronous = full',
  // 24 MiB of page cache (default 2 MiB): more of the random-key indexes of a large ingestion stay in memory
  // instead of spilling to the WAL mid-transaction (1M usage rows: 20.6 s -> 17.7 s for the raw driver).
  'pragma cache_size = -24576',
].join('; ');

/** Read-only connections beside the one writer (SQLite runs readers in parallel with its writer). */
const SQLITE_READERS = 2;
const SQLITE_READER_PRAGMAS = [`pragma busy_timeout = ${SQLITE_BUSY_STALL_MS}`, 'pragma query_only = on'].join('; ');

const PG_INT8_OID = 20;
/** pg_advisory_lock key that serializes migrations across replicas. */
const MIGRATION_LOCK_KEY = 72010002;

/**
 * Runs `fn` while holding a PostgreSQL session-level advisory lock on a
 * connection of its own. If that connection dies (a database restart), the
 * lock is gone with it: `fn` goes on, and the guards of its own writes
 * (unique keys, conditional updates) keep a second holder from doing harm.
 */
async function withPgSessionLock<T>(url: string, key: number, fn: () => Promise<T>, log?: Logger): Promise<T> {
  const client = new PgClient({ connectionString: url });
  // An 'error' event without a listener would end the process.
  client.on('error', (err) => log?.warn({ err, lockKey: key }, 'the connection holding an advisory lock was lost'));
  await client.connect();
  try {
    await client.query('select pg_advisory_lock($1)', [key]);
    try {
      return await fn();
    } finally {
      await client.query('select pg_advisory_unlock($1)', [key]).catch(() => undefined);
    }
  } finally {
    await client.end().catch(() => undefined);
  }
}

function pgTypeParser(oid: number, format?: string): (value: string) => unknown {
  if (oid === PG_INT8_OID) {
    // Ids and counts as numbers. A value beyond 2^53 (a money column that MikroORM's `select *` reads beside its
    // `cast(... as text)`, say) stays exact text rather than becoming a lossy number; Int64Type reads text.
    return (value: string) => {
      const n = Number(value);
      return Number.isSafeInteger(n) ? n : value;
    };
  }
  return pgTypes.getTypeParser(oid, format as 'text');
}

interface KnexClient {
  acquireConnection(): Promise<unknown>;
  releaseConnection(conn: unknown): unknown;
  /** knex's tarn pool. */
  pool?: { numPendingAcquires(): number };
}

/** What the engine uses of a better-sqlite3 connection. */
type SqliteRaw = SqliteConnection & {
  exec(sql: string): void;
  close(): void;
};

/** The better-sqlite3 module knex loaded (the engine opens its readers with the same one). */
type SqliteDriver = new (file: string, options: { readonly?: boolean; fileMustExist?: boolean }) => SqliteRaw;

interface KnexTransaction {
  begin(conn: unknown): Promise<unknown>;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Starts a write transaction holding the write lock from its first statement
 * on (BEGIN IMMEDIATE), so no later statement of it can meet SQLITE_BUSY.
 * While another process holds the lock, it tries again with short sleeps, the
 * event loop free, for up to SQLITE_LOCK_WAIT_MS; then SQLITE_BUSY goes up
 * (UNAVAILABLE to a caller). The writers of one database object never wait
 * here for each other: they share its one writer connection, one transaction
 * at a time; they wait for another process, or for the usage writer thread's
 * connection. `waiters`, shared between the threads of this process, counts
 * the connections waiting here (see Engine.writersWaiting).
 */
async function beginImmediate(conn: SqliteConnection, waiters: Int32Array | undefined): Promise<void> {
  const give = Date.now() + SQLITE_LOCK_WAIT_MS;
  // A writer of the other thread is waiting for the lock: it goes first. BEGIN IMMEDIATE keeps no queue, so a
  // chunked ingestion that commits for a waiter and begins its next chunk at once would win the lock again and
  // again while the waiter sleeps between its tries. (A thread has one writer connection: who waits is the other.)
  if (waiters) for (const until = Date.now() + SQLITE_HANDOFF_MAX_MS; Atomics.load(waiters, 0) > 0 && Date.now() < until; ) await sleep(1);
  let waiting = false;
  // No busy handler for these tries: SQLite's own (busy_timeout) sleeps inside BEGIN IMMEDIATE, blocking the thread
  // for up to SQLITE_BUSY_STALL_MS at each try; during a large ingestion on the usage writer thread, that was half
  // of the event loop's time.
  conn.prepare('pragma busy_timeout = 0').run();
  try {
    for (let pause = 1; ; pause = Math.min(pause * 2, SQLITE_LOCK_POLL_MAX_MS)) {
      try {
        conn.prepare('begin immediate').run();
        return;
      } catch (err) {
        if ((err as { code?: string }).code !== 'SQLITE_BUSY' || Date.now() >= give) throw err;
        if (waiters && !waiting) Atomics.add(waiters, 0, 1);
        waiting = true;
        await sleep(pause);
      }
    }
  } finally {
    conn.prepare(`pragma busy_timeout = ${SQLITE_BUSY_STALL_MS}`).run();
    if (waiters && waiting) Atomics.sub(waiters, 0, 1);
  }
}

export interface EngineOptions {
  migrate?: boolean;
  /** SQLite: one counter, shared by the threads that open this file, of writer connections waiting for the lock. */
  lockWaiters?: Int32Array;
}

export async function openEngine(db: DatabaseConfig, log: Logger, opts: EngineOptions): Promise<Engine> {
  // knex logs its own warnings (a dropped pooled connection, say) with console.log; route them to pino.
  const knexLog = {
    warn: (message: unknown) => log.warn({ component: 'knex' }, String(message)),
    error: (message: unknown) => log.error({ component: 'knex' }, String(message)),
    deprecate: (message: unknown) => log.debug({ component: 'knex' }, String(message)),
    debug: (message: unknown) => log.debug({ component: 'knex' }, String(message)),
  };
  const common = {
    // MikroORM creates a missing database on init unless told not to.
    ensureDatabase: opts.migrate !== false,
    entities,
    extensions: [Migrator],
    discovery: { warnWhenNoEntities: true },
    migrations: { migrationsList, transactional: true, allOrNothing: true, snapshot: false, silent: true },
    debug: false,
    allowGlobalContext: false,
    forceUndefined: false,
    implicitTransactions: true,
  };
  let orm: SqliteORM | import('@mikro-orm/postgresql').MikroORM;
  if (db.kind === 'sqlite') {
    orm = await SqliteORM.init(
      defineSqlite({
        ...common,
        dbName: db.path,
        driverOptions: { log: knexLog },
        pool: {
          min: 1,
          max: 1,
          afterCreate: (conn: SqliteRaw, done: (err: Error | null, conn: unknown) => void) => {
            try {
              conn.exec(SQLITE_PRAGMAS);
              done(null, conn);
            } catch (err) {
              done(err as Error, conn);
            }
          },
        },
      }),
    );
  } else {
    const pg = await import('@mikro-orm/postgresql');
    orm = await pg.MikroORM.init(
      pg.defineConfig({
        ...common,
        clientUrl: db.url,
        pool: { min: 1, max: 10 },
        // int8 ids and counts as JS numbers (they stay far below 2^53); money is read as text.
        driverOptions: { connection: { types: { getTypeParser: pgTypeParser } }, log: knexLog },
      }),
    );
  }
  const migrate = async () => {
    const migrator = orm.getMigrator();
    const pending = await migrator.getPendingMigrations();
    if (pending.length > 0) {
      log.info({ migrations: pending.map((m) => m.name) }, 'applying migrations');
      await migrator.up();
    }
  };
  try {
    // Several replicas may start at once: on PostgreSQL one migrates while the others wait on a session lock,
    // then find nothing pending. (SQLite has one writer and one process.)
    if (opts.migrate !== false) {
      if (db.kind === 'postgresql') await withPgSessionLock(db.url, MIGRATION_LOCK_KEY, migrate);
      else await migrate();
    }
  } catch (err) {
    await orm.close(true).catch(() => undefined);
    throw err;
  }
  const em = orm.em as unknown as EntityManager;
  const knexClient = em.getConnection().getKnex().client as KnexClient & {
    driver: SqliteDriver;
    transaction(...args: unknown[]): KnexTransaction;
  };
  /** The transaction's own connection (knex's transaction client hands out only that one). */
  const txConnection = (txEm: EntityManager): Promise<unknown> => {
    const trx = txEm.getTransactionContext() as { client: KnexClient } | undefined;
    if (!trx) throw new Error('statements need a transaction');
    return trx.client.acquireConnection();
  };

  if (db.kind === 'postgresql') {
    const names = new Map<string, string>();
    return {
      dialect: 'postgresql',
      em,
      statementsOf: async (txEm) => pgStatements((await txConnection(txEm)) as PgConnection, names),
      async read<T>(sql: string, params: unknown[]): Promise<T[]> {
        const conn = await knexClient.acquireConnection();
        try {
          return await pgStatements(conn as PgConnection, names).all<T>(sql, params, true);
        } finally {
          knexClient.releaseConnection(conn);
        }
      },
      async snapshot(work) {
        const conn = await knexClient.acquireConnection();
        try {
          const st = pgStatements(conn as PgConnection, names);
          await st.run('begin transaction isolation level repeatable read, read only', [], true);
          try {
            const value = await work((sql, params) => st.all(sql, params, true));
            await st.run('commit', [], true);
            return value;
          } catch (err) {
            await st.run('rollback', [], true).catch(() => undefined);
            throw err;
          }
        } finally {
          knexClient.releaseConnection(conn);
        }
      },
      withSessionLock: (key, fn) => withPgSessionLock(db.url, key, fn, log),
      writersWaiting: () => false,
      close: (force) => orm.close(force),
    };
  }

  // SQLite: every top-level transaction takes the write lock at BEGIN, waiting without blocking the event loop
  // (beginImmediate). knex issues a deferred BEGIN itself; its transaction objects let `begin` be replaced.
  const makeTransaction = knexClient.transaction.bind(knexClient);
  knexClient.transaction = (...args: unknown[]) => {
    const trx = makeTransaction(...args);
    trx.begin = (conn: unknown) => beginImmediate(conn as SqliteConnection, opts.lockWaiters);
    return trx;
  };

  // Kept statements per connection (the writer and each reader), held here.
  const kept = new WeakMap<object, Map<string, SqliteStatement>>();
  const keptOn = (conn: object) => {
    let map = kept.get(conn);
    if (!map) kept.set(conn, (map = new Map()));
    return map;
  };
  const file = db.path;
  const inMemory = sqliteInMemory(file);
  const openReader = (): SqliteRaw => {
    const conn = new knexClient.driver(file, { readonly: true, fileMustExist: true });
    conn.exec(SQLITE_READER_PRAGMAS);
    return conn;
  };
  // Each reader's statements, made once (a read is the hottest call there is).
  const readerConnections = inMemory ? [] : Array.from({ length: SQLITE_READERS }, openReader);
  const readers = readerConnections.map((reader) => sqliteStatements(reader, keptOn(reader)));
  let turn = 0;
  /** In memory there are no readers: a read takes the one connection (between transactions). */
  async function readInMemory<T>(sql: string, params: unknown[]): Promise<T[]> {
    const conn = (await knexClient.acquireConnection()) as SqliteConnection;
    try {
      return await sqliteStatements(conn, keptOn(conn)).all<T>(sql, params, true);
    } finally {
      knexClient.releaseConnection(conn);
    }
  }
  /**
   * Snapshots run on a reader of their own, one at a time (each is a few point reads): BEGIN, the reads,
   * COMMIT. A reader shared with plain reads would let those join an open snapshot and see older data.
   */
  const snapshotReader = inMemory ? null : openReader();
  let snapshotTail: Promise<unknown> = Promise.resolve();
  return {
    dialect: 'sqlite',
    em,
    statementsOf: async (txEm) => {
      const conn = (await txConnection(txEm)) as SqliteConnection;
      return sqliteStatements(conn, keptOn(conn));
    },
    read<T>(sql: string, params: unknown[]): Promise<T[]> {
      if (readers.length > 0) return readers[turn++ % readers.length].all<T>(sql, params, true);
      return readInMemory<T>(sql, params);
    },
    snapshot<T>(work: (read: <R>(sql: string, params: unknown[]) => Promise<R[]>) => Promise<T>): Promise<T> {
      const run = async (): Promise<T> => {
        if (!snapshotReader) {
          // In memory: the one connection, held for the whole of `work`, is the snapshot.
          const conn = (await knexClient.acquireConnection()) as SqliteConnection;
          try {
            const st = sqliteStatements(conn, keptOn(conn));
            return await work((sql, params) => st.all(sql, params, true));
          } finally {
            knexClient.releaseConnection(conn);
          }
        }
        const st = sqliteStatements(snapshotReader, keptOn(snapshotReader));
        await st.run('begin', [], true);
        try {
          return await work((sql, params) => st.all(sql, params, true));
        } finally {
          await st.run('commit', [], true);
        }
      };
      const result = snapshotTail.then(run, run);
      snapshotTail = result.catch(() => undefined);
      return result;
    },
    withSessionLock: (_key, fn) => fn(),
    writersWaiting: () => (knexClient.pool?.numPendingAcquires() ?? 0) > 0 || (opts.lockWaiters !== undefined && Atomics.load(opts.lockWaiters, 0) > 0),
    async close(force) {
      for (const reader of readerConnections) reader.close();
      snapshotReader?.close();
      await orm.close(force);
    },
  };
}
