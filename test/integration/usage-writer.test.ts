/**
 * The usage writer thread (src/usage/usage-writer.ts), SQLite only: batches
 * are committed by the thread's own connection, not the event loop's; what it
 * commits is visible to the event loop's reads at once; and a long ingestion
 * on the event loop's connection lets the thread's writes in between its
 * chunks instead of holding the write lock until it ends.
 */
import * as path from 'node:path';
import { onPostgres } from '../helpers/database';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { entry, writeNdjson } from '../helpers/usage';
import { event, micros, R, recordUsage } from '../helpers/usage-api';

const describeSqlite = onPostgres ? describe.skip : describe;

describeSqlite('the usage writer thread (USAGE_WRITER=thread)', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  async function user(n: number): Promise<bigint> {
    const { user } = await call(t.users, 'createUser', { email: `w${n}@example.com`, name: `W${n}`, requestId: '' });
    await call(t.wallets, 'addFunds', { userId: user!.id, amount: money('100'), requestId: '' });
    return user!.id;
  }

  it.each(['thread', 'inline'])('%s: who commits a batch, and the available balance moves at once', async (mode) => {
    t = await startTestApp({ USAGE_WRITER: mode }, { scheduler: false });
    const u = await user(1);
    const before = t.app.db.committedTransactions();
    const results = await recordUsage(t.usage, [event('w-1', u, 'api-calls', '100'), event('w-2', u, 'storage', '2')]);
    expect(results.map((r) => r.status)).toEqual([R.USAGE_EVENT_STATUS_ACCEPTED, R.USAGE_EVENT_STATUS_ACCEPTED]);
    // On the thread, the event loop's database object commits nothing for the batch; inline, it commits it.
    expect(t.app.db.committedTransactions() - before).toBe(mode === 'thread' ? 0 : 1);
    // 100 x $0.01 + 2 x $0.05 = $1.10 off the available balance, read by the event loop's reader right after.
    const b = await call(t.wallets, 'getBalance', { userId: u });
    expect(micros(b.balance)).toBe(100_000_000n);
    expect(micros(b.availableBalance)).toBe(100_000_000n - 1_100_000n);
    const again = await recordUsage(t.usage, [event('w-1', u, 'api-calls', '100')]);
    expect(again[0].status).toBe(R.USAGE_EVENT_STATUS_DUPLICATE);
    expect(again[0].usageId).toBe(results[0].usageId);
  });

  it('a batch sent while a large file is ingested is written between its chunks, before the run ends', async () => {
    t = await startTestApp({ USAGE_WRITER: 'thread' }, { scheduler: false });
    const file = path.join(t.dir, 'usage-logs.json'); // the harness's LOG_FILE_PATH (NDJSON is read by its content)
    const u = await user(1);
    const other = await user(2);
    writeNdjson(
      file,
      Array.from({ length: 150_000 }, (_, i) => entry(Number(other), 'api-calls', 1, { timestamp: new Date(Date.UTC(2026, 10, 1) + i * 1000).toISOString() })),
    );
    let runDone = 0;
    const run = call(t.jobs, 'processLogs', {}, { deadlineMs: 120_000 }).then((res) => {
      runDone = performance.now();
      return res;
    });
    // Wait until the run is RUNNING and a little more (it is writing its chunks), then send a batch.
    for (let i = 0; i < 400; i++) {
      const { jobRuns } = await call(t.jobs, 'listJobRuns', { pageSize: 5, pageToken: '' });
      if (jobRuns.some((r) => r.status === 1)) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    await new Promise((r) => setTimeout(r, 300));
    const results = await recordUsage(t.usage, [event('during-1', u, 'compute', '3')], { deadlineMs: 60_000 });
    const batchDone = performance.now();
    expect(results[0].status).toBe(R.USAGE_EVENT_STATUS_ACCEPTED);
    const { jobRun } = await run;
    expect(jobRun!.entriesAccepted).toBe(150_000n);
    // Answered while the run was still going: the batch did not wait for the write lock until the run's end.
    expect(runDone).toBeGreaterThan(0);
    expect(batchDone).toBeLessThan(runDone);
  });
});
