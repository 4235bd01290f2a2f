/**
 * The producer of the `events` benchmark, as a process of its own (so that its
 * synchronous SQLite commits do not stall the clients that time the
 * deliveries): appends `rate` events/s through the events door, `batch` per
 * transaction, for `seconds`, on the database its environment names, then
 * writes each event's commit instant (epoch ms, sub-ms: performance.timeOrigin
 * + performance.now(), when its transaction resolved) to the file given.
 * It prints "ready" once connected and starts at the first line on stdin.
 *
 *   node events-producer.js <out.json> <rate> <batch> <seconds>   (DB_PATH or DATABASE_URL in the environment)
 */
import * as fs from 'node:fs';
import pino from 'pino';
import { loadConfig } from '../../src/config';
import { openDatabase } from '../../src/db/database';
import { createEventsRepository } from '../../src/events/events.repository';
import type { NewEvent } from '../../src/events/events.types';

export const benchEvent = (k: number): NewEvent => ({
  type: 'user.created',
  userId: 1 + (k % 100),
  refId: null,
  payload: { name: `e${k}`, email: 'bench@example.com' },
});

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function main(): Promise<void> {
  const [out, rateArg, batchArg, secondsArg] = process.argv.slice(2);
  const rate = Number(rateArg);
  const batch = Number(batchArg);
  const seconds = Number(secondsArg);
  const tickMs = (batch * 1000) / rate;
  const db = await openDatabase(loadConfig({ ...process.env, LOG_LEVEL: 'silent' }).database, pino({ level: 'silent' }));
  const door = createEventsRepository(db);
  // Loaded and connected: say so, and start when told (start-up CPU is not part of the run).
  process.stdout.write('ready\n');
  await new Promise<void>((resolve) => process.stdin.once('data', () => resolve()));
  process.stdin.destroy(); // an open stdin would keep the process alive after the run
  const committedAt: number[] = [];
  const pending: Promise<void>[] = [];
  const started = performance.now();
  let k = 0;
  for (let tick = 0; performance.now() - started < seconds * 1000; tick++) {
    const due = started + tick * tickMs;
    if (due > performance.now()) await sleep(due - performance.now());
    const first = k;
    const events = Array.from({ length: batch }, () => benchEvent(k++));
    pending.push(
      db
        .transaction((tx) => door.append(tx, events, new Date()))
        .then(() => {
          const at = now();
          for (let i = 0; i < batch; i++) committedAt[first + i] = at;
        }),
    );
    if (pending.length > 64) await pending.shift();
  }
  await Promise.all(pending);
  const elapsedS = (performance.now() - started) / 1000;
  fs.writeFileSync(out, JSON.stringify({ elapsedS, committedAt }));
  await db.close();
}

if (require.main === module) {
  main().catch((err: unknown) => {
    process.stderr.write(`events producer failed: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(1);
  });
}
