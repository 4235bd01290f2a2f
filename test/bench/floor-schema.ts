/** The raw floors' databases: a new file with the service's pragmas and the schema of a database it migrated. */
import * as fs from 'node:fs';
import Database from 'better-sqlite3';
import { SQLITE_PRAGMAS } from '../../src/db/engine';

/** Creates `scratch` (removing any old one) with the tables and indexes of `schemaDb`, so both are the real ones. */
export function scratchWithSchema(schemaDb: string, scratch: string): Database.Database {
  const src = new Database(schemaDb, { readonly: true });
  const ddl = src
    .prepare(`select sql from sqlite_master where sql is not null and name not like 'sqlite_%' order by case type when 'table' then 0 else 1 end, rowid`)
    .all() as { sql: string }[];
  src.close();
  removeDb(scratch);
  const db = new Database(scratch);
  db.exec(SQLITE_PRAGMAS);
  for (const { sql } of ddl) db.exec(sql);
  return db;
}

/** Removes a database file and its WAL files. */
export function removeDb(file: string): void {
  for (const suffix of ['', '-wal', '-shm']) fs.rmSync(file + suffix, { force: true });
}
