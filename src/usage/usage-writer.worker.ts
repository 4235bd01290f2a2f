/**
 * The usage writer thread (see ./usage-writer.ts): its own database object on
 * the same SQLite file, the doors built as the app builds them, the usage
 * recorder and the ingestion runner. It answers `record` with a batch's
 * results once they are committed, `stage` with a sealed run, and `close` once
 * every call it took has been answered.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { openDatabase } from '../db/database';
import { isTransientDbError } from '../db/errors';
import { openDoors } from '../doors';
import { AppError } from '../shared/errors';
import { systemClock } from '../shared/clock';
import { createLogger } from '../shared/logger';
import { createIngestRunner } from './ingest';
import { createUsageRecorder } from './usage-recorder';
import type { FromWriter, ToWriter, WriterData } from './usage-writer';

async function main(): Promise<void> {
  const port = parentPort;
  if (!port) throw new Error('usage-writer.worker runs as a worker thread');
  const data = workerData as WriterData;
  const log = createLogger(data.logLevel).child({ component: 'usage-writer' });
  const post = (message: FromWriter) => port.postMessage(message);
  let db;
  try {
    db = await openDatabase(data.database, log, { migrate: false, lockWaiters: data.lockWaiters });
  } catch (err) {
    post({ type: 'failed', message: (err as Error).message });
    return;
  }
  const { usageLogs, ledger, records, alerts } = openDoors(db, systemClock, data);
  const common = { db, clock: systemClock, pricing: data.pricing, maxFutureSkewMs: data.maxFutureSkewMs, usageLogs, ledger, alerts };
  const recorder = createUsageRecorder(common);
  const runner = createIngestRunner({ ...common, log, logFilePath: data.logFilePath, readTimeoutMs: data.readTimeoutMs, records });
  const calls = new Map<number, AbortController>();
  let closing = false;
  const closeIfDone = async () => {
    if (!closing || calls.size > 0) return;
    await db.close();
    post({ type: 'closed' });
    port.close();
  };
  port.on('message', (message: ToWriter) => {
    if (message.type === 'abort') return calls.get(message.id)?.abort(new DOMException('the caller went away', 'AbortError'));
    if (message.type === 'close') {
      closing = true;
      void closeIfDone();
      return;
    }
    const abort = new AbortController();
    calls.set(message.id, abort);
    // Started at once, in the order the messages came: the group-commit queue keeps that order (a stream's batches).
    const work: Promise<unknown> = message.type === 'record' ? recorder.record(abort.signal, message.events) : runner.stage(message.jobRunId);
    work.then(
      (value) => post({ type: 'done', id: message.id, value }),
      (err: unknown) => {
        if (err instanceof AppError) post({ type: 'error', id: message.id, error: { kind: err.kind, reason: err.reason, message: err.message, field: err.field } });
        else {
          const transient = isTransientDbError(err);
          const expected = (err as Error)?.name === 'AbortError' || (err as Error)?.name === 'UsageFileUnusable' || transient;
          if (!expected) log.error({ err, call: message.type }, 'a call of the usage writer failed');
          post({ type: 'error', id: message.id, error: { name: (err as Error)?.name ?? 'Error', message: String((err as Error)?.message ?? err), transient } });
        }
      },
    ).finally(() => {
      calls.delete(message.id);
      void closeIfDone();
    });
  });
  post({ type: 'ready' });
}

main().catch((err: unknown) => {
  parentPort?.postMessage({ type: 'failed', message: (err as Error).message } satisfies FromWriter);
});
