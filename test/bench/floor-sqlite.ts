/**
 * The ingestion floor: a minimal raw script that puts the same rows the
 * service stores into the same schema with the same driver (node-sqlite3, the
 * `sqlite3` package under @mikro-orm/sqlite), the service's pragmas, one
 * transaction and multi-row prepared INSERTs.
 *
 *   node dist/test/bench/floor-sqlite.js <usage file> <migrated db> <scratch db> [rows per statement] [extra pragmas]
 *
 * The schema is copied from a database the service migrated, so indexes and
 * foreign keys are the real ones. Prints one JSON line:
 *   { rows, parseMs, insertMs, totalMs, peakRssBytes }
 * parseMs: read + JSON.parse + validate-free row building (identity hash and
 * occurrence number as the service computes them); insertMs: the inserts and
 * the commit alone.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as sqlite3 from 'sqlite3';
import { SQLITE_PRAGMAS } from '../../src/db/engine';

const COLUMNS = ['dedup_key', 'user_id', 'service', 'quantity', 'usage_at', 'status', 'reason', 'billing_record_id', 'job_run_id', 'ingested_at'];

function run(db: sqlite3.Database, sql: string, params: unknown[] = []): Promise<void> {
  return new Promise((resolve, reject) => db.run(sql, params, (err) => (err ? reject(err) : resolve())));
}
function all<T>(db: sqlite3.Database, sql: string, params: unknown[] = []): Promise<T[]> {
  return new Promise((resolve, reject) => db.all(sql, params, (err, rows) => (err ? reject(err) : resolve(rows as T[]))));
}
function exec(db: sqlite3.Database, sql: string): Promise<void> {
  return new Promise((resolve, reject) => db.exec(sql, (err) => (err ? reject(err) : resolve())));
}
function stmtRun(stmt: sqlite3.Statement, params: unknown[]): Promise<void> {
  return new Promise((resolve, reject) => stmt.run(params, (err) => (err ? reject(err) : resolve())));
}

/** "12.5" -> "12500000" (quantity scaled by 10^6), enough for the generated files. */
function scaled(text: string): string {
  const [int, frac = ''] = text.split('.');
  return (BigInt(int) * 1_000_000n + BigInt((frac + '000000').slice(0, 6))).toString();
}

async function main(): Promise<void> {
  const [file, schemaDb, scratch, rowsArg, extraPragmas] = process.argv.slice(2);
  const rowsPerStmt = Number(rowsArg ?? 200);
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 20);

  // Same schema as the service's (copied from a migrated database).
  const src = new sqlite3.Database(schemaDb, sqlite3.OPEN_READONLY);
  const ddl = await all<{ sql: string }>(
    src,
    `select sql from sqlite_master where sql is not null and name not like 'sqlite_%' order by case type when 'table' then 0 else 1 end, rowid`,
  );
  await new Promise<void>((r) => src.close(() => r()));
  for (const suffix of ['', '-wal', '-shm']) fs.rmSync(scratch + suffix, { force: true });
  const db = new sqlite3.Database(scratch);
  await exec(db, SQLITE_PRAGMAS);
  for (const { sql } of ddl) await exec(db, sql);
  if (extraPragmas) await exec(db, extraPragmas); // experiments only: pragmas or schema changes after the copy

  const t0 = performance.now();
  // Read and build the rows: JSON.parse, content hash, occurrence number.
  const text = fs.readFileSync(file, 'utf8');
  const entries: { userId: number; service: string; quantity: number | string; timestamp: string }[] = text.trimStart().startsWith('[')
    ? JSON.parse(text)
    : text.split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l));
  const now = Date.now();
  const seen = new Map<string, number>();
  const users = new Set<number>();
  const rows: unknown[][] = new Array(entries.length);
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i];
    // The parsed number is re-serialised; the generated quantities have at most 3 decimals, so this is exact.
    const q = scaled(String(e.quantity));
    const at = Date.parse(e.timestamp);
    const h = createHash('sha256').update(`${e.userId}\n${e.service}\n${q}\n${at}`).digest('base64url').slice(0, 22);
    const n = (seen.get(h) ?? 0) + 1;
    seen.set(h, n);
    users.add(e.userId);
    rows[i] = [`c:${h}:${n}`, e.userId, e.service, q, at, 'BILLED', '', e.userId, 1, now];
  }
  const t1 = performance.now();

  // Users, their records and the job run the rows point at (foreign keys are on); not timed.
  const userIds = [...users].sort((a, b) => a - b);
  await exec(db, 'begin');
  await run(db, `insert into job_runs (id, kind, status, trigger, started_at) values (1, 'PROCESS_LOGS', 'RUNNING', 'bench', ?)`, [now]);
  for (let i = 0; i < userIds.length; i += 500) {
    const ids = userIds.slice(i, i + 500);
    await run(
      db,
      `insert into users (id, email, name, status, created_at, updated_at) values ${ids.map(() => `(?, ?, 'u', 'ACTIVE', 0, 0)`).join(', ')}`,
      ids.flatMap((id) => [id, `u${id}@x`]),
    );
    await run(
      db,
      `insert into billing_records (id, user_id, kind, amount, status, description, created_at, updated_at) values ${ids
        .map(() => `(?, ?, 'USAGE', 0, 'PAID', '', 0, 0)`)
        .join(', ')}`,
      ids.flatMap((id) => [id, id]),
    );
  }
  await exec(db, 'commit');

  const t2 = performance.now();
  await exec(db, 'begin');
  const placeholders = (n: number) => Array.from({ length: n }, () => `(${COLUMNS.map(() => '?').join(', ')})`).join(', ');
  const sql = (n: number) => `insert into usage_logs (${COLUMNS.join(', ')}) values ${placeholders(n)} on conflict (dedup_key) do nothing`;
  const stmt = db.prepare(sql(rowsPerStmt));
  let i = 0;
  for (; i + rowsPerStmt <= rows.length; i += rowsPerStmt) {
    const params: unknown[] = [];
    for (let k = i; k < i + rowsPerStmt; k++) params.push(...rows[k]);
    await stmtRun(stmt, params);
  }
  await new Promise<void>((r) => stmt.finalize(() => r()));
  if (i < rows.length) await run(db, sql(rows.length - i), rows.slice(i).flat());
  await exec(db, 'commit');
  const t3 = performance.now();
  const [{ n }] = await all<{ n: number }>(db, 'select count(*) as n from usage_logs');
  await new Promise<void>((r) => db.close(() => r()));
  clearInterval(sampler);
  for (const suffix of ['', '-wal', '-shm']) fs.rmSync(scratch + suffix, { force: true });
  process.stdout.write(
    JSON.stringify({ rows: n, rowsPerStmt, parseMs: t1 - t0, insertMs: t3 - t2, totalMs: t1 - t0 + (t3 - t2), peakRssBytes: peak }) + '\n',
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`floor failed: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
