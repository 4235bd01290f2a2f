/**
 * Group commit for short write transactions on SQLite. SQLite has one writer
 * and, with synchronous=full, every COMMIT waits for an fsync; the raw driver
 * does about 2,000 single-credit transactions a second here, whatever the
 * code around it. Writes that arrive while one is committing are run, each in
 * its own SAVEPOINT, inside the next shared transaction, and all of them
 * commit with one fsync. A write that fails is rolled back to its savepoint
 * alone and fails at once; the others are answered only after their COMMIT
 * succeeded (and all fail if it does not). Durability is unchanged: nobody is
 * told "done" before the fsync.
 *
 * On PostgreSQL (real row locks and many connections) each write is its own
 * transaction, as before.
 */
import type { EntityManager } from '@mikro-orm/knex';
import { isPostgres } from './platform';
import { rawSql, type RawSql } from './raw';

export type GroupWork<T> = (tx: EntityManager, sql: RawSql) => Promise<T>;

interface Item {
  work: GroupWork<unknown>;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

/** Writes per shared transaction, at most. */
const MAX_GROUP = 256;

class Group {
  private readonly queue: Item[] = [];
  private running = false;

  constructor(private readonly em: EntityManager) {}

  submit<T>(work: GroupWork<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ work: work as GroupWork<unknown>, resolve: resolve as (v: unknown) => void, reject });
      if (!this.running) void this.drain();
    });
  }

  private async drain(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const items = this.queue.splice(0, MAX_GROUP);
        const done: { item: Item; value: unknown }[] = [];
        try {
          await this.em.fork().transactional(async (tx) => {
            const sql = await rawSql(tx);
            for (const item of items) {
              tx.clear(); // each write starts with an empty unit of work
              await sql.run('savepoint billing_group_write', [], { reuse: 'connection' });
              try {
                const value = await item.work(tx, sql);
                await sql.run('release billing_group_write', [], { reuse: 'connection' });
                done.push({ item, value });
              } catch (err) {
                await sql.run('rollback to billing_group_write', [], { reuse: 'connection' });
                await sql.run('release billing_group_write', [], { reuse: 'connection' });
                item.reject(err);
              }
            }
          });
        } catch (err) {
          // BEGIN or COMMIT failed: nothing of this group is written.
          for (const { item } of done) item.reject(err);
          for (const item of items) if (!done.some((d) => d.item === item)) item.reject(err);
          continue;
        }
        for (const { item, value } of done) item.resolve(value);
      }
    } finally {
      this.running = false;
    }
  }
}

const groups = new WeakMap<object, Group>();

/**
 * Runs `work` in a write transaction; on SQLite possibly shared with other
 * writes (see above). `work` must only write through `tx`/`sql` and must not
 * start transactions of its own.
 */
export function groupCommit<T>(em: EntityManager, work: GroupWork<T>): Promise<T> {
  if (isPostgres(em)) return em.transactional(async (tx) => work(tx, await rawSql(tx)));
  const key = em.getConnection();
  let group = groups.get(key);
  if (!group) groups.set(key, (group = new Group(em.fork())));
  return group.submit(work);
}
