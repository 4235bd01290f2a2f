/**
 * SQLite write transactions turn the event loop every few milliseconds of
 * statement work (database.ts, SLICE_MS): better-sqlite3 answers in
 * microtasks, so without those turns a long transaction ran to its COMMIT with
 * no call read from the network, no timer and no reader answered meanwhile.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Sqlite from 'better-sqlite3';
import pino from 'pino';
import { openDatabase, type Database } from '../../src/db/database';
import { createEventsRepository } from '../../src/events/events.repository';
import { createJobRunsRepository } from '../../src/jobs/job-runs.repository';
import { onPostgres } from '../helpers/database';

const describeSqlite = onPostgres ? describe.skip : describe;
/** About 10-30 ms of work on the event loop, whatever the machine. */
const SLOW_READ = 'with recursive c(x) as (select 1 union all select x + 1 from c where x < 200000) select count(*) as n from c';

/** A fresh SQLite file database for each test of the calling describe block. */
function freshDatabase(): { readonly dir: string; readonly db: Database } {
  const state = {} as { dir: string; db: Database };
  beforeEach(async () => {
    state.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-slices-'));
    state.db = await openDatabase({ kind: 'sqlite', path: path.join(state.dir, 'b.db') }, pino({ level: 'silent' }));
  });
  afterEach(async () => {
    await state.db.close();
    fs.rmSync(state.dir, { recursive: true, force: true });
  });
  return state;
}

describeSqlite('SQLite write transactions in slices', () => {
  const t = freshDatabase();

  /** Turns of the event loop (setImmediate callbacks) while `work` runs. */
  async function turnsDuring(work: () => Promise<unknown>): Promise<number> {
    let turns = 0;
    let on = true;
    const tick = () => {
      if (!on) return;
      turns++;
      setImmediate(tick);
    };
    setImmediate(tick);
    await new Promise((r) => setImmediate(r));
    const before = turns;
    await work();
    on = false;
    return turns - before;
  }

  it('a transaction of long statements lets the event loop turn between them', async () => {
    const turns = await turnsDuring(() =>
      t.db.transaction(async (tx) => {
        for (let i = 0; i < 10; i++) await tx.all(SLOW_READ, []);
      }),
    );
    expect(turns).toBeGreaterThanOrEqual(5);
  });

  it('so does a shared group-commit transaction of many writes', async () => {
    const turns = await turnsDuring(() => Promise.all(Array.from({ length: 10 }, () => t.db.groupWrite(async (tx) => tx.all(SLOW_READ, [])))));
    expect(turns).toBeGreaterThanOrEqual(5);
  });

  it('a write transaction waiting for the write lock keeps the event loop turning', async () => {
    // Another connection holds the write lock for half a second (the usage writer thread's, or another process).
    const holder = new Sqlite(path.join(t.dir, 'b.db'));
    holder.exec('begin immediate');
    const released = new Promise<void>((resolve) =>
      setTimeout(() => {
        holder.exec('commit');
        resolve();
      }, 500),
    );
    // The gaps between turns of the event loop while the transaction waits: SQLite's own busy handler
    // (busy_timeout) would sleep inside BEGIN IMMEDIATE, blocking the thread for up to 20 ms at a time.
    const gaps: number[] = [];
    let last = performance.now();
    let on = true;
    const tick = () => {
      if (!on) return;
      const now = performance.now();
      gaps.push(now - last);
      last = now;
      setImmediate(tick);
    };
    setImmediate(tick);
    await t.db.transaction(async (tx) => tx.run('create table waited (x integer)', []));
    on = false;
    await released;
    holder.close();
    const long = gaps.filter((g) => g >= 15).length;
    expect(long).toBeLessThan(5);
  });
});

describeSqlite('job runs while another connection holds the write lock', () => {
  const t = freshDatabase();

  // The usage writer thread holds SQLite's write lock for a chunk at a time during an ingestion, and the
  // run's own heartbeat (or a claim by the cron) must wait for it like every other write, not fail after
  // the 20 ms of SQLite's busy handler: a 1M-entry ingestion here logged "job run heartbeat failed" 3 times.
  it('a claim and a heartbeat wait for the lock instead of failing', async () => {
    const jobRuns = createJobRunsRepository(t.db, createEventsRepository(t.db));
    const holder = new Sqlite(path.join(t.dir, 'b.db'));
    const hold = (ms: number) => {
      holder.exec('begin immediate');
      return new Promise<void>((resolve) =>
        setTimeout(() => {
          holder.exec('commit');
          resolve();
        }, ms),
      );
    };
    let released: Promise<void> = Promise.resolve();
    try {
      released = hold(300);
      const run = await jobRuns.claim('PROCESS_LOGS', 'rpc', null, new Date(1_000));
      await released;
      expect(run).not.toBeNull();
      released = hold(300);
      await jobRuns.heartbeat(run!.id, new Date(2_000));
      await released;
      const rows = holder.prepare('select status, heartbeat_at as h from job_runs where id = ?').all(run!.id);
      expect(rows).toEqual([{ status: 'RUNNING', h: 2_000 }]);
    } finally {
      await released;
      holder.close();
    }
  });
});
