/**
 * Benchmark part `events`: the event stream of the built service.
 *
 * - Commit-to-watcher latency: `WATCHERS` WatchEvents streams (grpc-js
 *   clients in this process) while a producer process (./events-producer.ts)
 *   appends events through the events door on its own connection to the
 *   service's database, `BATCH` events per transaction every `TICK_MS`
 *   (1,000 events/s). Latency = the instant a client receives an event minus
 *   the instant its appending transaction resolved in the producer (the
 *   commit), both epoch ms from performance.timeOrigin + performance.now().
 *   Goal: p99 <= 100 ms.
 * - Memory: the service's RSS before and after opening `IDLE_WATCHERS`
 *   streams that receive nothing, per watcher; then one event to all of them
 *   (time until the last one has it), and the RSS once they are closed.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { loadConfig } from '../../src/config';
import { openDatabase, type Database } from '../../src/db/database';
import { createEventsRepository } from '../../src/events/events.repository';
import { cursorOf } from '../../src/events/events.types';
import * as eventPb from '../../generated/billing/v1/event_service';
import { benchEvent } from './events-producer';
import { freshDb, log, mb, pct, round, sleep, startService, type BenchOptions } from './common';

const WATCHERS = 10;
const EVENTS_PER_SECOND = 1000;
const TICK_MS = 10;
const BATCH = (EVENTS_PER_SECOND * TICK_MS) / 1000;
/** Events of the first seconds are produced and delivered but not measured (see the README: the first second is slow). */
const WARMUP_S = 2;
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
  /** CPU time the service and this (receiving) process used during the run, per second of it. */
  /** Deliveries over 100 ms among those of the warm-up (not in the figures). */
  warmupOver100Ms: number;
  /** Deliveries slower than the goal, and the seconds of the run (from the first commit) they belong to. */
  over100Ms: number;
  over100MsAtSecond: string;
  serviceCpuPerS: number;
  clientsCpuPerS: number;
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

const seqOf = (e: eventPb.Event): number => (e.payload?.$case === 'userCreated' ? Number(e.payload.value.name.slice(1)) : -1);

const watch = (client: eventPb.EventServiceClient, onEvent: (e: eventPb.Event) => void, afterCursor = '') => {
  const call = client.watchEvents({ afterCursor, types: [], userId: 0n });
  call.on('data', (r: eventPb.WatchEventsResponse) => onEvent(r.event!));
  call.on('error', () => undefined);
  return call;
};

/** utime + stime of a process, in seconds (/proc/<pid>/stat, clock ticks of 10 ms). */
function cpuSeconds(pid: number): number {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

const epochNow = () => performance.timeOrigin + performance.now();

/** Starts the producer process (./events-producer.ts); `go()` starts the run and resolves with its commit instants. */
async function producer(opts: BenchOptions, env: Record<string, string>, seconds: number): Promise<{ go: () => Promise<{ elapsedS: number; committedAt: number[] }> }> {
  const out = path.join(opts.workDir, `events-commits-${process.pid}.json`);
  const child = spawn(process.execPath, [path.join(__dirname, 'events-producer.js'), out, String(EVENTS_PER_SECOND), String(BATCH), String(seconds)], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve());
    void exited.then((code) => reject(new Error(`events producer exited (${code}) before it was ready: ${stderr}`)));
  });
  return {
    async go() {
      child.stdin!.write('go\n');
      const code = await exited;
      if (code !== 0) throw new Error(`events producer failed (${code}): ${stderr}`);
      return JSON.parse(fs.readFileSync(out, 'utf8')) as { elapsedS: number; committedAt: number[] };
    },
  };
}

async function latencyRun(opts: BenchOptions, address: string, env: Record<string, string>, servicePid: number): Promise<EventsLatencyRow> {
  const client = new eventPb.EventServiceClient(address, grpc.credentials.createInsecure());
  const received: [number, number][] = []; // [seq, at]
  const calls = Array.from({ length: WATCHERS }, () => watch(client, (e) => received.push([seqOf(e), epochNow()])));
  const run = await producer(opts, env, WARMUP_S + opts.rpcSeconds);
  await sleep(1000); // every stream open, its (empty) history read
  const cpu0 = [cpuSeconds(servicePid), cpuSeconds(process.pid)];
  const { elapsedS: totalS, committedAt } = await run.go();
  const cpu1 = [cpuSeconds(servicePid), cpuSeconds(process.pid)];
  const k = committedAt.length;
  const elapsedS = totalS - WARMUP_S;
  const measuredFrom = committedAt[0] + WARMUP_S * 1000;
  const warmupSlow = received.filter(([seq, at]) => committedAt[seq] < measuredFrom && at - committedAt[seq] > 100).length;
  const deadline = performance.now() + 10_000;
  while (received.length < k * WATCHERS && performance.now() < deadline) await sleep(50);
  for (const c of calls) c.cancel();
  client.close();
  const measured = received.filter(([seq]) => committedAt[seq] >= measuredFrom);
  const measuredEvents = committedAt.filter((at) => at >= measuredFrom).length;
  const latencies = Float64Array.from(measured.map(([seq, at]) => at - committedAt[seq])).sort();
  const slow = measured.filter(([seq, at]) => at - committedAt[seq] > 100);
  const slowSeconds = [...new Set(slow.map(([seq]) => Math.floor((committedAt[seq] - measuredFrom) / 1000)))].sort((a, b) => a - b);
  return {
    db: opts.db,
    watchers: WATCHERS,
    seconds: round(elapsedS, 1),
    eventsAppended: measuredEvents,
    appendedPerSecond: Math.round(measuredEvents / elapsedS),
    received: measured.length,
    warmupOver100Ms: warmupSlow,
    p50Ms: round(pct(latencies, 50), 1),
    p99Ms: round(pct(latencies, 99), 1),
    maxMs: round(latencies[latencies.length - 1] ?? NaN, 1),
    over100Ms: slow.length,
    over100MsAtSecond: slowSeconds.join(' '),
    serviceCpuPerS: round((cpu1[0] - cpu0[0]) / elapsedS),
    clientsCpuPerS: round((cpu1[1] - cpu0[1]) / elapsedS),
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
  const door = createEventsRepository(db);
  // After the newest event: idle (no history to read), until the one event below.
  const after = cursorOf(await door.lastId());
  const calls = Array.from({ length: IDLE_WATCHERS }, (_, i) => watch(clients[i % IDLE_CHANNELS], () => got++, after));
  await sleep(3000);
  const withWatchers = rss();
  await db.transaction((tx) => door.append(tx, [benchEvent(-1)], new Date()));
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
    const latency = await latencyRun(opts, service.address, benchDb.env, service.pid);
    log(`events: memory with ${IDLE_WATCHERS} idle watchers`);
    const memory = await memoryRun(opts, service.address, db, () => service.rss());
    const notes = [
      `commit = the appending transaction resolved in a producer process; receive = a grpc-js client in the bench process; service EVENT_POLL_MS default (25 ms)`,
    ];
    notes.push(`the first ${WARMUP_S} s of events (same rate) are delivered but not measured; warmupOver100Ms counts their deliveries over 100 ms`);
    if (latency.received < latency.eventsAppended * WATCHERS) notes.push(`only ${latency.received} of ${latency.eventsAppended * WATCHERS} deliveries arrived`);
    return { latency, memory, notes };
  } finally {
    await db.close();
    await service.stop();
    await benchDb.drop();
  }
}
