import { GroupCommit } from '../../src/db/group-commit';
import type { Tx } from '../../src/db/database';
import { AppError } from '../../src/shared/errors';

/** A fake transaction that records the statements and writes run in it. */
function fakeDb() {
  const log: string[] = [];
  let commits = 0;
  const tx = {
    em: { clear: () => undefined },
    run: async (sql: string) => {
      log.push(sql);
      return 0;
    },
    all: async () => [],
  } as unknown as Tx;
  const group = new GroupCommit(async (work) => {
    const value = await work(tx);
    commits++;
    return value;
  });
  return { group, log, commits: () => commits };
}

describe('group commit', () => {
  it('writes that arrive while one commits share the next transaction, each in its own savepoint', async () => {
    const { group, log, commits } = fakeDb();
    const first = group.submit(async () => new Promise((r) => setTimeout(() => r(0), 20)));
    await new Promise((r) => setTimeout(r, 5)); // the first transaction is running
    const results = await Promise.all([1, 2, 3].map((n) => group.submit(async () => n * 10)));
    await first;
    expect(results).toEqual([10, 20, 30]);
    expect(commits()).toBe(2);
    expect(log.filter((s) => s.startsWith('savepoint'))).toHaveLength(4);
  });

  it('writes submitted in the same event-loop turn share one transaction even when the database answers synchronously', async () => {
    // better-sqlite3: every statement is done when its promise is made, so a transaction needs no I/O turn at all.
    const { group, commits } = fakeDb();
    const submitted: Promise<number>[] = [];
    for (let n = 0; n < 5; n++) {
      submitted.push(group.submit(async () => n));
      await Promise.resolve(); // each call reaches the queue a few microtasks after the one before
    }
    expect(await Promise.all(submitted)).toEqual([0, 1, 2, 3, 4]);
    expect(commits()).toBe(1);
  });

  it('a failing write is rolled back to its savepoint alone; the others commit', async () => {
    const { group, log } = fakeDb();
    const outcomes = await Promise.allSettled([
      group.submit(async () => 'a'),
      group.submit(async () => {
        throw new Error('no');
      }),
      group.submit(async () => 'c'),
    ]);
    expect(outcomes.map((o) => o.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
    expect(log.filter((s) => s.startsWith('rollback to'))).toHaveLength(1);
  });

  it('does not run a write whose caller went away before its turn', async () => {
    const { group } = fakeDb();
    const gone = new AbortController();
    let ran = false;
    const first = group.submit(async () => new Promise((r) => setTimeout(r, 20)));
    const second = group.submit(async () => {
      ran = true;
    }, gone.signal);
    gone.abort(new AppError('CANCELLED', 'CALL_CANCELLED', 'gone'));
    await first;
    await expect(second).rejects.toMatchObject({ kind: 'CANCELLED' });
    expect(ran).toBe(false);
  });
});
