/** ORM options for the configured database, and start-up (connect + migrate). */
import { MikroORM as SqliteORM, defineConfig as defineSqlite } from '@mikro-orm/sqlite';
import type { EntityManager } from '@mikro-orm/knex';
import { Migrator } from '@mikro-orm/migrations';
import { Client as PgClient, types as pgTypes } from 'pg';
import type { Logger } from 'pino';
import type { DatabaseConfig } from '../config';
import { entities } from './entities';
import { migrationsList } from './migrations';
import { openSqliteReaders } from './raw';

export type Orm = { em: EntityManager; close(force?: boolean): Promise<void>; kind: DatabaseConfig['kind'] };

interface SqliteRawConnection {
  exec(sql: string, cb: (err: Error | null) => void): void;
}

/** Applied to every SQLite connection (exported so the benchmark's raw-driver floor uses the same settings). */
export const SQLITE_PRAGMAS = [
  'pragma journal_mode = wal',
  'pragma busy_timeout = 5000',
  'pragma foreign_keys = on',
  'pragma synchronous = full',
  // 24 MiB of page cache (default 2 MiB): more of the random-key indexes of a large ingestion stay in memory
  // instead of spilling to the WAL mid-transaction (1M usage rows: 20.6 s -> 17.7 s for the raw driver).
  'pragma cache_size = -24576',
].join('; ');

/** Read-only connections for rawRead (SQLite runs readers in parallel with its one writer). */
const SQLITE_READERS = 2;
const SQLITE_READER_PRAGMAS = ['pragma busy_timeout = 5000', 'pragma query_only = on'].join('; ');

const PG_INT8_OID = 20;
/** pg_advisory_lock key that serializes migrations across replicas. */
const MIGRATION_LOCK_KEY = 72010002;

/** Runs `fn` while holding a PostgreSQL session-level advisory lock on a connection of its own. */
async function withPgSessionLock<T>(url: string, key: number, fn: () => Promise<T>): Promise<T> {
  const client = new PgClient({ connectionString: url });
  await client.connect();
  try {
    await client.query('select pg_advisory_lock($1)', [key]);
    try {
      return await fn();
    } finally {
      await client.query('select pg_advisory_unlock($1)', [key]);
    }
  } finally {
    await client.end();
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

export interface OpenOrmOptions {
  /**
   * Apply pending migrations (default true). Tools that inspect a database
   * they do not own (the invariant checker) pass false and check the schema;
   * then a missing PostgreSQL database is not created either.
   */
  migrate?: boolean;
}

export async function openOrm(db: DatabaseConfig, log: Logger, opts: OpenOrmOptions = {}): Promise<Orm> {
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
          afterCreate: (conn: SqliteRawConnection, done: (err: Error | null, conn: unknown) => void) =>
            conn.exec(SQLITE_PRAGMAS, (err) => done(err, conn)),
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
    // migrate: false leaves the schema as it is; the caller checks it.
    if (opts.migrate !== false) {
      if (db.kind === 'postgresql') await withPgSessionLock(db.url, MIGRATION_LOCK_KEY, migrate);
      else await migrate();
    }
  } catch (err) {
    await orm.close(true).catch(() => undefined);
    throw err;
  }
  const em = orm.em as unknown as EntityManager;
  // SQLite: read-only connections beside the one writer serve the hot reads (db/raw.ts rawRead).
  const readers = db.kind === 'sqlite' && db.path !== ':memory:' && db.path !== '' ? await openSqliteReaders(em, db.path, SQLITE_READERS, SQLITE_READER_PRAGMAS) : null;
  return {
    em,
    kind: db.kind,
    close: async (force?: boolean) => {
      await readers?.close();
      await orm.close(force);
    },
  };
}
