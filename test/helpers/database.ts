/**
 * Which database the integration suite runs on: SQLite (a temporary file) by
 * default, PostgreSQL when TEST_DATABASE=postgres. On PostgreSQL each test app
 * gets a fresh database, created on the server at TEST_PG_ADMIN_URL (default
 * postgres://postgres@127.0.0.1:5432/postgres) and dropped when it stops.
 */
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { Client } from 'pg';

export const onPostgres = process.env.TEST_DATABASE === 'postgres';
export const adminUrl = process.env.TEST_PG_ADMIN_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';

async function admin<T>(fn: (c: Client) => Promise<T>): Promise<T> {
  const client = new Client({ connectionString: adminUrl });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

export interface TestDatabase {
  /** Environment for loadConfig: DB_PATH or DATABASE_URL. */
  env: Record<string, string>;
  drop(): Promise<void>;
}

/** A new empty database (PostgreSQL) or a file path in `dir` (SQLite). */
export async function createTestDatabase(dir: string): Promise<TestDatabase> {
  if (!onPostgres) return { env: { DB_PATH: path.join(dir, 'billing.db') }, drop: async () => undefined };
  const name = `billing_test_${process.pid}_${randomBytes(4).toString('hex')}`;
  await admin((c) => c.query(`create database ${name}`));
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return {
    env: { DATABASE_URL: url.toString() },
    drop: () => admin((c) => c.query(`drop database if exists ${name} with (force)`)).then(() => undefined),
  };
}
