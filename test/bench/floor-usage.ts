/**
 * The floor of usage over gRPC: the writes that recording a batch of 1,000
 * events needs, straight through better-sqlite3 (the service's driver) with
 * the service's pragmas on the service's schema, and nothing else (no gRPC, no
 * protobuf, no validation, no ORM):
 *
 *   BEGIN IMMEDIATE; look up the batch's dedup keys (kept 500-key statements);
 *   look up its users' wallets; INSERT the rows (500 per statement, on conflict
 *   do nothing, returning the ids); upsert the pending totals; COMMIT
 *
 * with `batches per commit` batches in one transaction (1: a commit per batch;
 * the service's group commit may put several in one), for `seconds`.
 *
 *   node dist/test/bench/floor-usage.js <migrated db> <scratch db> <seconds> <batches per commit>
 *
 * Prints one JSON line: { events, seconds, eventsPerSecond, commits }.
 */
import type Database from 'better-sqlite3';
import { removeDb, scratchWithSchema } from './floor-schema';
import { BENCH_USERS, benchEvent } from './usage-data';

const COLUMNS = ['dedup_key', 'user_id', 'service', 'quantity', 'usage_at', 'status', 'reason', 'billing_record_id', 'job_run_id', 'ingested_at', 'source'];
const BATCH = 1000;
const PART = 500;
const TWO_32 = 4294967296n;

function scaled(text: string): bigint {
  const [int, frac = ''] = text.split('.');
  return BigInt(int) * 1_000_000n + BigInt((frac + '000000').slice(0, 6));
}

function main(): void {
  const [schemaDb, scratch, secondsArg, perCommitArg] = process.argv.slice(2);
  const seconds = Number(secondsArg);
  const perCommit = Number(perCommitArg ?? 1);
  const db = scratchWithSchema(schemaDb, scratch);

  // The users and wallets the events are for (not timed).
  const now = Date.now();
  db.exec('begin');
  const user = db.prepare(`insert into users (id, email, name, status, created_at, updated_at) values (?, ?, 'u', 'ACTIVE', ?, ?)`);
  const wallet = db.prepare(`insert into wallets (user_id, balance, created_at, updated_at) values (?, 1000000000000000, ?, ?)`);
  for (let id = 1; id <= BENCH_USERS; id++) {
    user.run(id, `u${id}@bench`, now, now);
    wallet.run(id, now, now);
  }
  db.exec('commit');

  const probe = db.prepare(`select dedup_key from usage_logs where dedup_key in (${Array.from({ length: PART }, () => '?').join(', ')})`);
  const wallets = db.prepare(`select user_id, closed_at is not null as closed from wallets where user_id in (${Array.from({ length: PART }, () => '?').join(', ')})`);
  const insert = db.prepare(
    `insert into usage_logs (${COLUMNS.join(', ')}) values ${Array.from({ length: PART }, () => `(${COLUMNS.map(() => '?').join(', ')})`).join(', ')} ` +
      `on conflict (dedup_key) do nothing returning id`,
  );
  const totals = new Map<number, ReturnType<Database.Database['prepare']>>();
  const totalsOf = (n: number) => {
    let stmt = totals.get(n);
    if (!stmt) {
      stmt = db.prepare(
        `insert into usage_pending_totals (user_id, service, quantity_hi, quantity_lo, entries) values ${Array.from({ length: n }, () => '(?, ?, ?, ?, ?)').join(', ')}
         on conflict (user_id, service) do update set quantity_hi = usage_pending_totals.quantity_hi + excluded.quantity_hi,
           quantity_lo = usage_pending_totals.quantity_lo + excluded.quantity_lo, entries = usage_pending_totals.entries + excluded.entries`,
      );
      totals.set(n, stmt);
    }
    return stmt;
  };

  let k = 0;
  let events = 0;
  let commits = 0;
  const started = performance.now();
  const until = started + seconds * 1000;
  while (performance.now() < until) {
    db.exec('begin immediate');
    for (let b = 0; b < perCommit; b++) {
      const batch = Array.from({ length: BATCH }, () => benchEvent('floor', k++));
      const keys = batch.map((e) => `e:${e.id}`);
      for (let i = 0; i < BATCH; i += PART) probe.all(keys.slice(i, i + PART));
      const userIds = [...new Set(batch.map((e) => e.userId))];
      for (let i = 0; i < userIds.length; i += PART) {
        const part = userIds.slice(i, i + PART);
        while (part.length < PART) part.push(part[0]);
        wallets.all(part);
      }
      const at = Date.now();
      const deltas = new Map<string, { userId: number; service: string; quantity: bigint; entries: number }>();
      for (let i = 0; i < BATCH; i += PART) {
        const params: unknown[] = [];
        for (const e of batch.slice(i, i + PART)) {
          const q = scaled(e.quantity);
          params.push(`e:${e.id}`, e.userId, e.service, q.toString(), e.time.getTime(), 'PENDING', '', null, null, at, 'API');
          const key = `${e.userId}\u0000${e.service}`;
          const d = deltas.get(key);
          if (d) {
            d.quantity += q;
            d.entries++;
          } else deltas.set(key, { userId: e.userId, service: e.service, quantity: q, entries: 1 });
        }
        insert.all(params);
      }
      const list = [...deltas.values()].sort((a, b) => a.userId - b.userId || (a.service < b.service ? -1 : 1));
      for (let i = 0; i < list.length; i += PART) {
        const part = list.slice(i, i + PART);
        totalsOf(part.length).run(part.flatMap((d) => [d.userId, d.service, (d.quantity / TWO_32).toString(), (d.quantity % TWO_32).toString(), d.entries]));
      }
      events += BATCH;
    }
    db.exec('commit');
    commits++;
  }
  const s = (performance.now() - started) / 1000;
  db.close();
  removeDb(scratch);
  process.stdout.write(JSON.stringify({ events, seconds: s, eventsPerSecond: events / s, commits }) + '\n');
}

try {
  main();
} catch (err) {
  process.stderr.write(`usage floor failed: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
}
