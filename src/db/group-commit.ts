/**
 * Group commit for short write transactions on SQLite. SQLite has one writer
 * and, with synchronous=full, every COMMIT waits for an fsync. Writes that
 * arrive while one transaction is committing are run, each in its own
 * SAVEPOINT, inside the next shared transaction, and all of them commit with
 * one fsync. A write that fails is rolled back to its savepoint alone and
 * fails at once; the others are answered only after their COMMIT succeeded
 * (and all fail if it does not). Durability is unchanged: nobody is told
 * "done" before the fsync. A write whose caller went away (its signal is
 * aborted) before its turn is not run.
 *
 * One instance per database object (database.ts), which owns the queue.
 */
import type { Tx } from './database';

type Work<T> = (tx: Tx) => Promise<T>;

interface Item {
  work: Work<unknown>;
  signal?: AbortSignal;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

/** Writes per shared transaction, at most. */
const MAX_GROUP = 256;

export class GroupCommit {
  private readonly queue: Item[] = [];
  private draining: Promise<void> | null = null;

  /** `transaction` runs one shared transaction (the database object's). */
  constructor(private readonly transaction: <T>(work: Work<T>) => Promise<T>) {}

  submit<T>(work: Work<T>, signal?: AbortSignal): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason);
      this.queue.push({ work: work as Work<unknown>, signal, resolve: resolve as (v: unknown) => void, reject });
      this.draining ??= this.drain().finally(() => (this.draining = null));
    });
  }

  /** Resolves once every submitted write has been answered. */
  async close(): Promise<void> {
    await this.draining;
  }

  private async drain(): Promise<void> {
    for (;;) {
      // better-sqlite3 answers synchronously, so a shared transaction runs to its COMMIT in microtasks: started at
      // once, it would take only the write that started it, and the calls read from the network in the same I/O
      // turn would each get their own fsync. Waiting for the end of the turn (setImmediate) lets them all join.
      await new Promise<void>((resolve) => setImmediate(resolve));
      if (this.queue.length === 0) return;
      const items = this.queue.splice(0, MAX_GROUP);
      const done: { item: Item; value: unknown }[] = [];
      const failed = new Set<Item>();
      try {
        await this.transaction(async (tx) => {
          for (const item of items) {
            if (item.signal?.aborted) {
              failed.add(item);
              item.reject(item.signal.reason);
              continue;
            }
            tx.em.clear(); // each write starts with an empty unit of work
            await tx.run('savepoint billing_group_write', [], { keep: true });
            try {
              const value = await item.work(tx);
              await tx.run('release billing_group_write', [], { keep: true });
              done.push({ item, value });
            } catch (err) {
              await tx.run('rollback to billing_group_write', [], { keep: true });
              await tx.run('release billing_group_write', [], { keep: true });
              failed.add(item);
              item.reject(err);
            }
          }
        });
      } catch (err) {
        // BEGIN or COMMIT failed: nothing of this group is written.
        for (const item of items) if (!failed.has(item)) item.reject(err);
        continue;
      }
      for (const { item, value } of done) item.resolve(value);
    }
  }
}
