/**
 * Part 3, retries: 10,000 PENDING records (one per user, every wallet able to
 * pay) whose retry is due at the same moment T. The service is restarted
 * before T so its scheduler picks the schedule up from the database, as after
 * a crash. Reports the time to drain (T to the last commit the bench sees) and
 * how late each retry fired: paid_at (the service's clock when it charged)
 * minus T, and the commit time the bench observed by polling every 10 ms.
 * On SQLite the floor (floor-retries.ts: the same writes by a raw better-sqlite3
 * script in one transaction, on a copy of the same seeded database) runs in
 * the same run.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import { clients, freshDb, log, paths, pct, round, seedUsers, sleep, startService, type BenchOptions } from './common';

const RECORDS = 10_000;
const AMOUNT = 1_000_000n; // $1
const DESCRIPTION = 'bench retry';

export interface RetriesResult {
  db: string;
  records: number;
  drainMs: number;
  lateP50Ms: number;
  lateP99Ms: number;
  lateMaxMs: number;
  observedP50Ms: number;
  observedP99Ms: number;
  observedMaxMs: number;
  paid: number;
  /** Raw-driver floor: the same charges in one transaction (SQLite). */
  floorMs?: number;
  /** drainMs / floorMs. */
  ratioToFloor?: number;
}

function runRetryFloor(file: string, due: number): Promise<{ records: number; paid: number; ms: number }> {
  return new Promise((resolve, reject) =>
    execFile(process.execPath, [paths.benchJs('floor-retries.js'), file, String(due)], (err, stdout, stderr) =>
      err ? reject(new Error(`retry floor failed: ${stderr}`)) : resolve(JSON.parse(stdout.trim())),
    ),
  );
}

export async function runRetries(opts: BenchOptions): Promise<RetriesResult> {
  const db = await freshDb(opts, 'retries');
  try {
    // First start: migrate. Then seed users and the due records, and restart.
    let svc = await startService(opts, db.env, 'retries-migrate');
    await svc.stop();
    await seedUsers(db, RECORDS, 100n * AMOUNT);
    const leadMs = 8000;
    const due = Date.now() + leadMs;
    await db.exec('begin');
    for (let first = 1; first <= RECORDS; first += 500) {
      const ids: number[] = [];
      for (let id = first; id < first + 500 && id <= RECORDS; id++) ids.push(id);
      await db.query(
        `insert into billing_records (id, user_id, kind, amount, status, description, attempt_count, next_attempt_at, failure_reason, created_at, updated_at)
         values ${ids.map(() => `(?, ?, 'MANUAL', ?, 'PENDING', '${DESCRIPTION}', 1, ?, 'INSUFFICIENT_FUNDS', ?, ?)`).join(', ')}`,
        ids.flatMap((id) => [id, id, AMOUNT.toString(), due, due - leadMs, due - leadMs]),
      );
    }
    await db.exec('commit');
    if (db.kind === 'postgres') await db.query(`select setval(pg_get_serial_sequence('billing_records', 'id'), ?)`, [RECORDS]);
    let floor: { records: number; paid: number; ms: number } | undefined;
    if (db.file) {
      // The floor charges a copy of the same seeded database (closing the connection checkpoints the WAL).
      await db.close();
      fs.copyFileSync(db.file, db.file + '.floor');
      floor = await runRetryFloor(db.file + '.floor', due);
      for (const suffix of ['', '-wal', '-shm']) fs.rmSync(db.file + '.floor' + suffix, { force: true });
      if (floor.records !== RECORDS) throw new Error(`the retry floor charged ${floor.records} records, expected ${RECORDS}`);
      log(`retry floor: ${JSON.stringify(floor)}`);
    }
    svc = await startService(opts, db.env, 'retries');
    const c = clients(svc.address);
    try {
      if (Date.now() > due - 500) throw new Error('the service took too long to start; raise leadMs');
      log(`retries: ${RECORDS} records due in ${due - Date.now()} ms`);
      // Poll commits: each newly PAID record is stamped with the poll's time.
      const observed: number[] = [];
      let paid = 0;
      const giveUp = due + 600_000;
      while (paid < RECORDS && Date.now() < giveUp) {
        const waitFor = due - Date.now();
        await sleep(waitFor > 50 ? waitFor - 50 : 10);
        const rows = await db.query<{ n: number | string }>(
          `select count(*) as n from billing_records where status = 'PAID' and description = ?`,
          [DESCRIPTION],
        );
        const now = Date.now();
        const n = Number(rows[0].n);
        for (let k = paid; k < n; k++) observed.push(now - due);
        paid = n;
      }
      const late = (
        await db.query<{ at: number | string }>(`select paid_at as at from billing_records where status = 'PAID' and description = ?`, [DESCRIPTION])
      )
        .map((r) => Number(r.at) - due)
        .sort((a, b) => a - b);
      observed.sort((a, b) => a - b);
      const result: RetriesResult = {
        db: opts.db,
        records: RECORDS,
        drainMs: observed.length ? observed[observed.length - 1] : NaN,
        lateP50Ms: pct(late, 50),
        lateP99Ms: pct(late, 99),
        lateMaxMs: late[late.length - 1],
        observedP50Ms: pct(observed, 50),
        observedP99Ms: pct(observed, 99),
        observedMaxMs: observed[observed.length - 1],
        paid,
      };
      if (floor) {
        result.floorMs = floor.ms;
        result.ratioToFloor = result.drainMs / floor.ms;
      }
      for (const k of Object.keys(result) as (keyof RetriesResult)[]) {
        if (typeof result[k] === 'number') (result as unknown as Record<string, number>)[k] = round(result[k] as number, 1);
      }
      log(`retries: ${JSON.stringify(result)}`);
      return result;
    } finally {
      c.close();
      await svc.stop();
    }
  } finally {
    await db.drop();
  }
}
