/**
 * The usage writer thread. On SQLite, better-sqlite3 runs every statement and
 * every COMMIT on the thread that calls it, and a batch of 1,000 events is
 * tens of milliseconds of inserts, index updates and an fsync: on the event
 * loop, that is time no other call is answered (GetBalance waited 100-320 ms
 * beside four streams of usage). So the writes of usage are done by a worker
 * thread with a connection of its own to the same file: RecordUsage and
 * StreamUsage batches, and the stage of an ingestion run (reading and parsing
 * the file, storing its entries in chunks, sealing the run with its records).
 * The event loop decodes and answers calls and charges a sealed run's records;
 * the other core writes usage.
 *
 * Guarantees are those of the file: SQLite's write lock orders the thread's
 * transactions with the event loop's (each begins with BEGIN IMMEDIATE and
 * waits without blocking its thread), so there is still one writer at a time,
 * ids are still taken in commit order, and a batch is answered only after its
 * COMMIT. The thread is used for a SQLite file with the system clock; on
 * PostgreSQL (asynchronous I/O, many connections) and in-memory SQLite the
 * recorder runs on the event loop. USAGE_WRITER=inline turns it off.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import type { DatabaseConfig } from '../config';
import { AppError, type ErrorKind } from '../shared/errors';
import type { UsageEventInput, UsageEventResult } from './usage.service';
import { UsageFileUnusable, type IngestRunner, type StagedRun } from './ingest';
import type { UsageRecorder } from './usage-recorder';

/** What the thread is started with. */
export interface WriterData {
  database: DatabaseConfig;
  logLevel: string;
  pricing: ReadonlyMap<string, bigint>;
  lowBalanceThreshold: bigint;
  maxFutureSkewMs: number;
  logFilePath: string;
  readTimeoutMs: number;
  lockWaiters: Int32Array;
}

export type ToWriter =
  | { type: 'record'; id: number; events: readonly UsageEventInput[] }
  | { type: 'stage'; id: number; jobRunId: number }
  | { type: 'abort'; id: number }
  | { type: 'close' };

/** An AppError as it was; any other error by name and message, and whether it was a transient database error. */
type WireError = { kind: ErrorKind; reason: string; message: string; field?: string } | { name: string; message: string; transient: boolean };

export type FromWriter =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'done'; id: number; value: unknown }
  | { type: 'error'; id: number; error: WireError }
  | { type: 'closed' };

export interface UsageWriter extends UsageRecorder, IngestRunner {
  /** Answers the batches it took, then stops the thread and closes its connection. */
  close(): Promise<void>;
}

/** The compiled thread's script, beside this module (dist/src/usage/), or null when running from sources. */
export function usageWriterScript(): string | null {
  const script = path.join(__dirname, 'usage-writer.worker.js');
  return fs.existsSync(script) ? script : null;
}

/**
 * The thread's V8 old generation, at most (MB). V8 lets an old generation grow
 * to a multiple of what the last full collection kept before it collects
 * again: 4x under the default limit on this kind of machine (some GB), 1.3-2x
 * under a limit of 2 GB or less. A 1M-entry ingestion keeps about 27 MB alive
 * on the thread but promotes garbage all along (each batch outlives the
 * scavenges of the chunk it waits for): under the default the thread's old
 * generation grew to 113-127 MB between collections, under this limit to
 * 44-52 MB. Back to back, 1M NDJSON entries: 84.1 s and peak RSS 365 MB
 * without it, 84.9 s and 259 MB with it (the raw floor 55.2 s, 58.3 s).
 * The limit also keeps a runaway thread from taking the
 * process down with it: out of memory, the thread ends, its calls fail
 * UNAVAILABLE and the next one starts a new thread.
 */
const WRITER_OLD_SPACE_MB = 1024;
/**
 * The thread's V8 young generation, at most (MB): two semi-spaces of 4 MB.
 * Under the default V8 grows them to 16 MB each during an ingestion and
 * keeps them: 30 MB of the thread's heap that hold garbage. Run Q (README)
 * measured an ingestion's cost and peak with and without it.
 */
const WRITER_YOUNG_SPACE_MB = 12;

interface Pending {
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

const revive = (e: WireError): Error => {
  if ('kind' in e) return new AppError(e.kind, e.reason, e.message, e.field);
  if (e.name === 'UsageFileUnusable') return new UsageFileUnusable(e.message);
  // A transient database error (the lock held past SQLITE_LOCK_WAIT_MS, say) stays one: UNAVAILABLE to the caller.
  const err = Object.assign(new Error(e.message), e.transient ? { code: 'SQLITE_BUSY' } : {});
  err.name = e.name;
  return err;
};

/**
 * Starts the thread and resolves once its database is open. If the thread
 * dies, the batches it held fail with UNAVAILABLE (nothing of an unanswered
 * batch is claimed: the producer resends it) and the next batch starts a new one.
 */
export async function startUsageWriter(script: string, data: WriterData, log: Logger): Promise<UsageWriter> {
  let next = 1;
  let closed = false;
  const pending = new Map<number, Pending>();
  let current: Promise<Worker> | null = null;

  const failAll = (why: string) => {
    for (const p of pending.values()) p.reject(new AppError('UNAVAILABLE', 'USAGE_WRITER_FAILED', `the usage writer stopped (${why}); the batch may be sent again`));
    pending.clear();
  };

  const spawn = (): Promise<Worker> =>
    new Promise<Worker>((resolve, reject) => {
      const worker = new Worker(script, { workerData: data, resourceLimits: { maxOldGenerationSizeMb: WRITER_OLD_SPACE_MB, maxYoungGenerationSizeMb: WRITER_YOUNG_SPACE_MB } });
      let ready = false;
      worker.on('message', (m: FromWriter) => {
        if (m.type === 'ready') {
          ready = true;
          resolve(worker);
        } else if (m.type === 'failed') {
          reject(new Error(`the usage writer could not start: ${m.message}`));
        } else if (m.type === 'done' || m.type === 'error') {
          const p = pending.get(m.id);
          pending.delete(m.id);
          if (m.type === 'done') p?.resolve(m.value);
          else p?.reject(revive(m.error));
        }
      });
      worker.on('error', (err) => {
        log.error({ err }, 'the usage writer thread failed');
        if (!ready) reject(err);
      });
      worker.on('exit', (code) => {
        current = null;
        if (!ready) reject(new Error(`the usage writer exited with ${code} before it was ready`));
        if (pending.size > 0) failAll(`exit code ${code}`);
      });
    });

  const worker = () => (current ??= spawn().catch((err: unknown) => {
    current = null;
    throw err;
  }));
  await worker();

  /** Sends one call to the thread; `signal` (a caller that went away) is passed on as an abort. */
  async function send<T>(message: ToWriter & { id: number }, signal?: AbortSignal): Promise<T> {
    const w = await worker();
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => w.postMessage({ type: 'abort', id: message.id } satisfies ToWriter);
      signal?.addEventListener('abort', onAbort, { once: true });
      const settle = () => signal?.removeEventListener('abort', onAbort);
      pending.set(message.id, {
        resolve: (v) => (settle(), resolve(v as T)),
        reject: (e) => (settle(), reject(e)),
      });
      w.postMessage(message);
    });
  }

  const refuseWhenClosed = () => {
    if (closed) throw new AppError('UNAVAILABLE', 'SHUTTING_DOWN', 'the service is shutting down');
  };

  return {
    // No `after`: the thread takes messages in the order they were sent and submits each batch to its group-commit
    // queue at once, so the batches of one stream are written in stream order anyway.
    async record(signal, events) {
      refuseWhenClosed();
      signal.throwIfAborted();
      return send<UsageEventResult[]>({ type: 'record', id: next++, events }, signal);
    },
    async stage(jobRunId) {
      refuseWhenClosed();
      return send<StagedRun>({ type: 'stage', id: next++, jobRunId });
    },
    async close() {
      closed = true;
      const running = current;
      if (!running) return;
      const w = await running.catch(() => null);
      if (!w) return;
      await new Promise<void>((resolve) => {
        w.once('exit', () => resolve());
        w.on('message', (m: FromWriter) => {
          if (m.type === 'closed') void w.terminate();
        });
        w.postMessage({ type: 'close' } satisfies ToWriter);
      });
    },
  };
}
