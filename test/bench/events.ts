/**
 * Benchmark part `events`: the event stream of the built service.
 *
 * - Commit-to-watcher latency: `WATCHERS` WatchEvents streams (grpc-js
 *   clients in this process) while this process appends events through the
 *   events door on its own connection to the service's database, `BATCH`
 *   events per transaction every `TICK_MS` (1,000 events/s). Latency = the
 *   moment a client receives an event minus the moment its appending
 *   transaction resolved here (the commit), both on this process's clock.
 *   Goal: p99 <= 100 ms.
 * - Memory: the service's RSS before and after opening `IDLE_WATCHERS`
 *   streams that receive nothing, per watcher; then one event to all of them
 *   (time until the last one has it), and the RSS once they are closed.
 */
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { loadConfig } from '../../src/config';
import { openDatabase, type Database } from '../../src/db/database';
import { createEventsRepository } from '../../src/events/events.repository';
import type { NewEvent } from '../../src/events/events.types';
import * as eventPb from '../../generated/billing/v1/event_service';
import { freshDb, log, mb, pct, round, sleep, startService, type BenchOptions } from './common';

const WATCHERS = 10;
const EVENTS_PER_SECOND = 1000;
const TICK_MS = 10;
const BATCH = (EVENTS_PER_SECOND * TICK_MS) / 1000;
const IDLE_WATCHERS = 1000;
/** Channels the idle watchers are spread over (streams per HTTP/2 connection stay under MAX_CONCURRENT_STREAMS). */
const IDLE_CHANNELS = 4;

export interface EventsLatencyRow {
  db: string;
  watchers: number;
  seconds: number;
  eventsAppended: number;
  appendedPerSecond: number;
  received: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

export interface EventsMemoryRow {
  db: string;
  watchers: number;
  rssBeforeMb: number;
  rssWithWatchersMb: number;
  kbPerWatcher: number;
  oneEventToAllMs: number;
  rssAfterCloseMb: number;
}

export interface EventsResult {
  latency: EventsLatencyRow;
  memory: EventsMemoryRow;
  notes: string[];
}

const event = (k: number): NewEvent => ({ type: 'user.created', userId: 1 + (k % 100), refId: null, payload: { name: `e${k}`, email: 'bench@example.com' } });
const seqOf = (e: eventPb.Event): number => (e.payload?.$case === 'userCreated' ? Number(e.payload.value.name.slice(1)) : -1);

const watch = (client: eventPb.EventServiceClient, onEvent: (e: eventPb.Event) => void) => {
  const call = client.watchEvents({ afterCursor: '', types: [], userId: 0n });
  call.on('data', (r: eventPb.WatchEventsResponse) => onEvent(r.event!));
  call.on('error', () => undefined);
  return call;
};

async function latencyRun(opts: BenchOptions, address: string, db: Database): Promise<EventsLatencyRow> {
  const door = createEventsRepository(db);
  const client = new eventPb.EventServiceClient(address, grpc.credentials.createInsecure());
  const committedAt: number[] = [];
  const received: [number, number][] = []; // [seq, at]
  const calls = Array.from({ length: WATCHERS }, () => watch(client, (e) => received.push([seqOf(e), performance.now()])));
  await sleep(1000); // every stream open, its (empty) history read
  const seconds = opts.rpcSeconds;
  const started = performance.now();
  let k = 0;
  const pending: Promise<void>[] = [];
  for (let tick = 0; performance.now() - started < seconds * 1000; tick++) {
    const due = started + tick * TICK_MS;
    if (due > performance.now()) await sleep(due - performance.now());
    const first = k;
    const events = Array.from({ length: BATCH }, () => event(k++));
    pending.push(
      db
        .transaction((tx) => door.append(tx, events, new Date()))
        .then(() => {
          const at = performance.now();
          for (let i = 0; i < BATCH; i++) committedAt[first + i] = at;
        }),
    );
    if (pending.length > 64) await pending.shift();
  }
  await Promise.all(pending);
  const elapsed = (performance.now() - started) / 1000;
  const deadline = performance.now() + 10_000;
  while (received.length < k * WATCHERS && performance.now() < deadline) await sleep(50);
  for (const c of calls) c.cancel();
  client.close();
  const latencies = Float64Array.from(received.map(([seq, at]) => at - committedAt[seq])).sort();
  return {
    db: opts.db,
    watchers: WATCHERS,
    seconds: round(elapsed, 1),
    eventsAppended: k,
    appendedPerSecond: Math.round(k / elapsed),
    received: received.length,
    p50Ms: round(pct(latencies, 50), 1),
    p99Ms: round(pct(latencies, 99), 1),
    maxMs: round(latencies[latencies.length - 1] ?? NaN, 1),
  };
}

async function memoryRun(opts: BenchOptions, address: string, db: Database, rss: () => number): Promise<EventsMemoryRow> {
  const clients = Array.from(
    { length: IDLE_CHANNELS },
    (_, i) => new eventPb.EventServiceClient(address, grpc.credentials.createInsecure(), { 'grpc.bench_channel': i }),
  );
  await sleep(2000);
  const before = rss();
  let got = 0;
  const calls = Array.from({ length: IDLE_WATCHERS }, (_, i) => watch(clients[i % IDLE_CHANNELS], () => got++));
  await sleep(3000);
  const withWatchers = rss();
  const door = createEventsRepository(db);
  await db.transaction((tx) => door.append(tx, [event(-1)], new Date()));
  const t = performance.now();
  while (got < IDLE_WATCHERS && performance.now() - t < 10_000) await sleep(1);
  const oneToAll = performance.now() - t;
  for (const c of calls) c.cancel();
  for (const c of clients) c.close();
  await sleep(3000);
  return {
    db: opts.db,
    watchers: IDLE_WATCHERS,
    rssBeforeMb: mb(before),
    rssWithWatchersMb: mb(withWatchers),
    kbPerWatcher: round((withWatchers - before) / 1024 / IDLE_WATCHERS, 1),
    oneEventToAllMs: got < IDLE_WATCHERS ? NaN : round(oneToAll, 1),
    rssAfterCloseMb: mb(rss()),
  };
}

export async function runEvents(opts: BenchOptions): Promise<EventsResult> {
  const benchDb = await freshDb(opts, 'events');
  const service = await startService(opts, { ...benchDb.env }, 'events');
  // The bench's own connection to the service's database, through the events door.
  const db = await openDatabase(loadConfig({ ...benchDb.env, LOG_LEVEL: 'silent' }).database, pino({ level: 'silent' }));
  try {
    log(`events: latency with ${WATCHERS} watchers at ${EVENTS_PER_SECOND} events/s (${BATCH} per transaction every ${TICK_MS} ms)`);
    const latency = await latencyRun(opts, service.address, db);
    log(`events: memory with ${IDLE_WATCHERS} idle watchers`);
    const memory = await memoryRun(opts, service.address, db, () => service.rss());
    const notes = [
      `commit = the appending transaction resolved in the bench process; receive = a grpc-js client in the same process; service EVENT_POLL_MS default (25 ms)`,
    ];
    if (latency.received < latency.eventsAppended * WATCHERS) notes.push(`only ${latency.received} of ${latency.eventsAppended * WATCHERS} deliveries arrived`);
    return { latency, memory, notes };
  } finally {
    await db.close();
    await service.stop();
    await benchDb.drop();
  }
}
