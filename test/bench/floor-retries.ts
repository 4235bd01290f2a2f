/**
 * The retry floor: the writes that charging N due records needs, done by a
 * minimal raw script with the same driver (better-sqlite3) and pragmas on a copy
 * of the seeded database: read the due records and their wallets, debit each
 * wallet, write each DEBIT ledger row, move each record to PAID, in one
 * transaction of multi-row statements (as few statements as the parameter
 * limit allows). Prints { records, ms }.
 *
 *   node dist/test/bench/floor-retries.js <seeded db copy> <due epoch ms>
 */
import Database from 'better-sqlite3';
import { SQLITE_PRAGMAS } from '../../src/db/engine';

const all = <T>(db: Database.Database, sql: string, params: unknown[] = []) => db.prepare(sql).all(params) as T[];
const run = (db: Database.Database, sql: string, params: unknown[] = []) => db.prepare(sql).run(params);

/** Rows per statement so that no statement binds more than 30,000 parameters. */
const per = (columns: number) => Math.floor(30_000 / columns);

function main(): void {
  const [file, dueArg] = process.argv.slice(2);
  const due = Number(dueArg);
  const db = new Database(file);
  db.exec(SQLITE_PRAGMAS);
  const t0 = performance.now();
  db.exec('begin');
  const records = all<{ id: number; user_id: number; amount: string; attempt_count: number }>(
    db,
    `select id, user_id, cast(amount as text) as amount, attempt_count from billing_records where status = 'PENDING' and next_attempt_at <= ? order by next_attempt_at, id`,
    [due],
  );
  const users = records.map((r) => r.user_id);
  const balances = new Map<number, bigint>();
  for (let i = 0; i < users.length; i += per(1)) {
    const part = users.slice(i, i + per(1));
    const rows = all<{ user_id: number; balance: string }>(
      db,
      `select user_id, cast(balance as text) as balance from wallets where user_id in (${part.map(() => '?').join(', ')})`,
      part,
    );
    for (const r of rows) balances.set(r.user_id, BigInt(r.balance));
  }
  const debits = new Map<number, bigint>();
  const ledger: unknown[][] = [];
  for (const r of records) {
    const after = balances.get(r.user_id)! - BigInt(r.amount);
    balances.set(r.user_id, after);
    debits.set(r.user_id, (debits.get(r.user_id) ?? 0n) + BigInt(r.amount));
    ledger.push([r.user_id, r.amount, after.toString(), r.id, due]);
  }
  const wallets = [...debits.entries()];
  for (let i = 0; i < wallets.length; i += per(2)) {
    const part = wallets.slice(i, i + per(2));
    run(
      db,
      `update wallets set balance = wallets.balance - v.amount, updated_at = ${due}
       from (select column1 as user_id, column2 as amount from (values ${part.map(() => '(?, cast(? as bigint))').join(', ')}) as t) as v
       where wallets.user_id = v.user_id and wallets.balance >= v.amount`,
      part.flatMap(([u, a]) => [u, a.toString()]),
    );
  }
  for (let i = 0; i < ledger.length; i += per(5)) {
    const part = ledger.slice(i, i + per(5));
    run(
      db,
      `insert into wallet_transactions (user_id, type, amount, balance_after, billing_record_id, request_id, created_at)
       values ${part.map(() => `(?, 'DEBIT', cast(? as bigint), cast(? as bigint), ?, null, ?)`).join(', ')}`,
      part.flat(),
    );
  }
  for (let i = 0; i < records.length; i += per(2)) {
    const part = records.slice(i, i + per(2));
    run(
      db,
      `update billing_records set status = 'PAID', paid_at = ${due}, updated_at = ${due}, attempt_count = v.attempt_count + 1,
         next_attempt_at = null, failure_reason = ''
       from (select column1 as id, column2 as attempt_count from (values ${part.map(() => '(?, ?)').join(', ')}) as t) as v
       where billing_records.id = v.id and billing_records.status = 'PENDING' and billing_records.attempt_count = v.attempt_count`,
      part.flatMap((r) => [r.id, r.attempt_count]),
    );
  }
  db.exec('commit');
  const ms = performance.now() - t0;
  const [{ n }] = all<{ n: number }>(db, `select count(*) as n from billing_records where status = 'PAID'`);
  db.close();
  process.stdout.write(JSON.stringify({ records: records.length, paid: n, ms }) + '\n');
}

try {
  main();
} catch (err: unknown) {
  process.stderr.write(`retry floor failed: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
}
