/**
 * The ingestion floor: a minimal raw script that puts the same rows the
 * service stores into the same schema with the same driver (better-sqlite3, the
 * package under @mikro-orm/better-sqlite), the service's pragmas, one
 * transaction and multi-row prepared INSERTs.
 *
 *   node dist/test/bench/floor-sqlite.js <usage file> <migrated db> <scratch db> [rows per statement] [extra pragmas] [key]
 *
 * The schema is copied from a database the service migrated, so indexes and
 * foreign keys are the real ones. Prints one JSON line:
 *   { rows, parseMs, insertMs, totalMs, cpuMs, peakRssBytes }
 * parseMs: read + JSON.parse + validate-free row building (identity hash and
 * occurrence number as the service computes them); insertMs: the inserts and
 * the commit alone; cpuMs: this process's CPU time (user + system) over both.
 *
 * `key` measures other designs of the identity index (`npm run bench --
 * --floor-keys`): `text` (the default) is the service's, a unique index on
 * the dedup_key text, in random order; `int` keeps the text in the row but
 * makes the unique index a 64-bit integer (the first 8 bytes of the key's
 * SHA-256; the service would also need the text to tell two keys apart);
 * `none` has no identity index at all (not exactly-once: a bound, not a
 * design).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { removeDb, scratchWithSchema } from './floor-schema';

const TEXT_COLUMNS = ['dedup_key', 'user_id', 'service', 'quantity', 'usage_at', 'status', 'reason', 'billing_record_id', 'job_run_id', 'ingested_at'];
type KeyDesign = 'text' | 'int' | 'none';

/** "12.5" -> "12500000" (quantity scaled by 10^6), enough for the generated files. */
function scaled(text: string): string {
  const [int, frac = ''] = text.split('.');
  return (BigInt(int) * 1_000_000n + BigInt((frac + '000000').slice(0, 6))).toString();
}

async function main(): Promise<void> {
  const [file, schemaDb, scratch, rowsArg, extraPragmas, keyArg] = process.argv.slice(2);
  const rowsPerStmt = Number(rowsArg || 200);
  const key = (keyArg || 'text') as KeyDesign;
  if (!['text', 'int', 'none'].includes(key)) throw new Error(`key is text, int or none, not ${keyArg}`);
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 20);

  // Same schema as the service's (copied from a migrated database).
  const db = scratchWithSchema(schemaDb, scratch);
  if (extraPragmas) db.exec(extraPragmas); // experiments only: pragmas or schema changes after the copy
  if (key !== 'text') db.exec('drop index usage_logs_dedup_unique');
  if (key === 'int') db.exec('alter table usage_logs add column key64 integer; create unique index usage_logs_key64_unique on usage_logs (key64)');
  const COLUMNS = key === 'int' ? [...TEXT_COLUMNS, 'key64'] : TEXT_COLUMNS;
  const onConflict = key === 'text' ? ' on conflict (dedup_key) do nothing' : key === 'int' ? ' on conflict (key64) do nothing' : '';

  const t0 = performance.now();
  const c0 = process.cpuUsage();
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
    const dedupKey = `c:${h}:${n}`;
    rows[i] = [dedupKey, e.userId, e.service, q, at, 'BILLED', '', e.userId, 1, now];
    if (key === 'int') rows[i].push(createHash('sha256').update(dedupKey).digest().readBigInt64BE(0));
  }
  const t1 = performance.now();
  const parseCpu = process.cpuUsage(c0);

  // Users, their records and the job run the rows point at (foreign keys are on); not timed.
  const userIds = [...users].sort((a, b) => a - b);
  db.exec('begin');
  db.prepare(`insert into job_runs (id, kind, status, trigger, started_at) values (1, 'PROCESS_LOGS', 'RUNNING', 'bench', ?)`).run(now);
  for (let i = 0; i < userIds.length; i += 500) {
    const ids = userIds.slice(i, i + 500);
    db.prepare(`insert into users (id, email, name, status, created_at, updated_at) values ${ids.map(() => `(?, ?, 'u', 'ACTIVE', 0, 0)`).join(', ')}`).run(
      ids.flatMap((id) => [id, `u${id}@x`]),
    );
    db.prepare(
      `insert into billing_records (id, user_id, kind, amount, status, description, created_at, updated_at) values ${ids
        .map(() => `(?, ?, 'USAGE', 0, 'PAID', '', 0, 0)`)
        .join(', ')}`,
    ).run(ids.flatMap((id) => [id, id]));
  }
  db.exec('commit');

  const t2 = performance.now();
  const c2 = process.cpuUsage();
  db.exec('begin');
  const placeholders = (n: number) => Array.from({ length: n }, () => `(${COLUMNS.map(() => '?').join(', ')})`).join(', ');
  const sql = (n: number) => `insert into usage_logs (${COLUMNS.join(', ')}) values ${placeholders(n)}${onConflict}`;
  const stmt = db.prepare(sql(rowsPerStmt));
  let i = 0;
  for (; i + rowsPerStmt <= rows.length; i += rowsPerStmt) {
    const params: unknown[] = [];
    for (let k = i; k < i + rowsPerStmt; k++) params.push(...rows[k]);
    stmt.run(params);
  }
  if (i < rows.length) db.prepare(sql(rows.length - i)).run(rows.slice(i).flat());
  db.exec('commit');
  const t3 = performance.now();
  const insertCpu = process.cpuUsage(c2);
  const cpuMs = (parseCpu.user + parseCpu.system + insertCpu.user + insertCpu.system) / 1000;
  const { n } = db.prepare('select count(*) as n from usage_logs').get() as { n: number };
  db.close();
  clearInterval(sampler);
  removeDb(scratch);
  process.stdout.write(
    JSON.stringify({ rows: n, rowsPerStmt, key, parseMs: t1 - t0, insertMs: t3 - t2, totalMs: t1 - t0 + (t3 - t2), cpuMs, peakRssBytes: peak }) + '\n',
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`floor failed: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
