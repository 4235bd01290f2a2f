/**
 * Benchmark part `usage-api`: usage over gRPC into the built service.
 *
 * - RecordUsage with batches of 100 and 1,000 events, `RECORD_IN_FLIGHT` calls
 *   at once: events/s and call latency (the answer comes after the commit).
 * - StreamUsage with one and with four streams, each keeping `STREAM_WINDOW`
 *   batches of 1,000 in flight: events/s and ack latency (send -> ack, after
 *   the commit), while a GetBalance loop runs beside the streams on its own
 *   thread (probe-worker.ts): its p99.
 * - GetUsageSummary of one user's month with at least 1M rows in usage_logs
 *   (topped up with rows written by the bench's own connection).
 */
import * as grpc from '@grpc/grpc-js';
import * as usagePb from '../../generated/billing/v1/usage_service';
import { execFile } from 'node:child_process';
import { freshDb, log, paths, pct, seedUsers, startService, unary, type BenchOptions } from './common';
import { startBalanceProbe } from './probe-worker';
import { BENCH_SERVICES, BENCH_USERS, benchEvent, MONTH_MS, MONTH_START } from './usage-data';

const USERS = BENCH_USERS;
const RECORD_IN_FLIGHT = 8;
const STREAM_WINDOW = 8;
const SERVICES = BENCH_SERVICES;
/** Batches per COMMIT of the raw floor's two runs: one (a commit per batch) and STREAM_WINDOW (as group commit may). */
const FLOOR_PER_COMMIT = [1, STREAM_WINDOW];

export interface UsageApiRow {
  part: string;
  events: number;
  seconds: number;
  eventsPerSecond: number;
  latencyP50Ms?: number;
  latencyP99Ms?: number;
  getBalanceP99Ms?: number;
  getBalanceCalls?: number;
  /** Service rows: events/s over the best raw floor of the same run (SQLite). */
  ratioToFloor?: number;
}

let serial = 0;
function batch(n: number, prefix: string): usagePb.UsageEvent[] {
  return Array.from({ length: n }, () => {
    const e = benchEvent(prefix, serial++);
    return { ...e, userId: BigInt(e.userId) };
  });
}

/** The raw floor (floor-usage.ts) on a copy of this database's schema. */
function runUsageFloor(schemaDb: string, seconds: number, perCommit: number): Promise<{ events: number; seconds: number; eventsPerSecond: number; commits: number }> {
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [paths.benchJs('floor-usage.js'), schemaDb, `${schemaDb}.floor`, String(seconds), String(perCommit)],
      { maxBuffer: 1 << 20 },
      (err, stdout, stderr) => (err ? reject(new Error(`usage floor failed: ${stderr}`)) : resolve(JSON.parse(stdout.trim()))),
    );
  });
}

const sorted = (xs: number[]) => Float64Array.from(xs).sort();

async function recordRun(client: usagePb.UsageServiceClient, size: number, seconds: number): Promise<UsageApiRow> {
  const latencies: number[] = [];
  let events = 0;
  const until = performance.now() + seconds * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: RECORD_IN_FLIGHT }, async () => {
      while (performance.now() < until) {
        const events_ = batch(size, `r${size}`);
        const t = performance.now();
        const res = await unary<usagePb.RecordUsageResponse>(client, 'recordUsage', { events: events_ });
        latencies.push(performance.now() - t);
        if (res.results.some((r) => r.status !== usagePb.UsageEventStatus.USAGE_EVENT_STATUS_ACCEPTED)) throw new Error('an event was not ACCEPTED');
        events += size;
      }
    }),
  );
  const s = (performance.now() - started) / 1000;
  const l = sorted(latencies);
  return { part: `RecordUsage x${size}`, events, seconds: s, eventsPerSecond: events / s, latencyP50Ms: pct(l, 50), latencyP99Ms: pct(l, 99) };
}

/** One stream sending batches of 1,000 for `seconds`, STREAM_WINDOW unanswered at most; resolves with its ack latencies. */
function streamRun(client: usagePb.UsageServiceClient, seconds: number, tag: string): Promise<{ events: number; latencies: number[] }> {
  return new Promise((resolve, reject) => {
    const call = client.streamUsage({ deadline: Date.now() + (seconds + 120) * 1000 });
    const sentAt: number[] = [];
    const latencies: number[] = [];
    let sent = 0;
    let acked = 0;
    let ending = false;
    const until = performance.now() + seconds * 1000;
    const pump = () => {
      while (!ending && sent - acked < STREAM_WINDOW) {
        if (performance.now() >= until) {
          ending = true;
          call.end();
          return;
        }
        sentAt.push(performance.now());
        sent++;
        call.write({ batchId: String(sent), events: batch(1000, tag) });
      }
    };
    call.on('data', (ack: usagePb.StreamUsageResponse) => {
      latencies.push(performance.now() - sentAt[Number(ack.sequence) - 1]);
      acked++;
      pump();
    });
    call.on('error', reject);
    call.on('status', (st: grpc.StatusObject) => (st.code === grpc.status.OK ? resolve({ events: acked * 1000, latencies }) : reject(new Error(st.details))));
    pump();
  });
}

async function streamsRun(usage: usagePb.UsageServiceClient, address: string, n: number, seconds: number): Promise<UsageApiRow> {
  const probe = startBalanceProbe(address, USERS);
  const started = performance.now();
  const results = await Promise.all(Array.from({ length: n }, (_, i) => streamRun(usage, seconds, `s${n}-${i}`)));
  const s = (performance.now() - started) / 1000;
  const balanceLatencies = await probe.stop();
  const events = results.reduce((sum, r) => sum + r.events, 0);
  const l = sorted(results.flatMap((r) => r.latencies));
  const b = sorted(balanceLatencies);
  return {
    part: `StreamUsage x${n} stream(s)`,
    events,
    seconds: s,
    eventsPerSecond: events / s,
    latencyP50Ms: pct(l, 50),
    latencyP99Ms: pct(l, 99),
    getBalanceP99Ms: pct(b, 99),
    getBalanceCalls: b.length,
  };
}

export async function runUsageApi(opts: BenchOptions): Promise<{ rows: UsageApiRow[]; summary: Record<string, number>; notes: string[] }> {
  const db = await freshDb(opts, 'usage-api');
  const svc = await startService(opts, db.env, 'usage-api');
  const notes: string[] = [];
  try {
    await seedUsers(db, USERS, 10n ** 15n);
    const creds = grpc.credentials.createInsecure();
    const usage = new usagePb.UsageServiceClient(svc.address, creds);
    const seconds = opts.rpcSeconds;
    const rows: UsageApiRow[] = [];
    for (const size of [100, 1000]) {
      log(`usage-api: RecordUsage x${size} for ${seconds} s`);
      rows.push(await recordRun(usage, size, seconds));
    }
    for (const n of [1, 4]) {
      log(`usage-api: ${n} StreamUsage stream(s) for ${seconds} s, GetBalance beside`);
      rows.push(await streamsRun(usage, svc.address, n, seconds));
    }
    if (db.kind === 'sqlite') {
      // The floor: the same writes per batch of 1,000 straight through the driver, no service (floor-usage.ts).
      let best = 0;
      for (const perCommit of FLOOR_PER_COMMIT) {
        log(`usage-api: raw floor, ${perCommit} batch(es) of 1,000 per COMMIT, for ${seconds} s`);
        const f = await runUsageFloor(db.file!, seconds, perCommit);
        best = Math.max(best, f.eventsPerSecond);
        rows.push({ part: `raw floor, ${perCommit} batch(es)/COMMIT`, events: f.events, seconds: f.seconds, eventsPerSecond: f.eventsPerSecond });
      }
      for (const r of rows) if (!r.part.startsWith('raw floor')) r.ratioToFloor = r.eventsPerSecond / best;
    }

    // ---- summary of one user's month with >= 1M rows in the table ----
    const [{ n: have }] = await db.query<{ n: number | string }>('select count(*) as n from usage_logs');
    const missing = Math.max(0, 1_000_000 - Number(have));
    log(`usage-api: ${have} rows stored; adding ${missing} filler rows (REJECTED: no balance changes) straight into usage_logs for the summary`);
    const chunk = 500;
    const now = Date.now();
    await db.exec('begin');
    for (let done = 0; done < missing; done += chunk) {
      const k = Math.min(chunk, missing - done);
      const params: unknown[] = [];
      for (let i = 0; i < k; i++) {
        const j = done + i;
        params.push(`bench-fill-${j}`, 1 + (j % USERS), SERVICES[j % 4], String(1_000_000 * (1 + (j % 50))), MONTH_START + ((j * 104729) % MONTH_MS), now);
      }
      await db.query(
        `insert into usage_logs (dedup_key, user_id, service, quantity, usage_at, status, reason, billing_record_id, job_run_id, ingested_at, source)
         values ${Array.from({ length: k }, () => `(?, ?, ?, ?, ?, 'REJECTED', 'BENCH_FILL', null, null, ?, 'API')`).join(', ')}`,
        params,
      );
    }
    await db.exec('commit');
    // Those fill rows are REJECTED (not counted by summaries, not in the pending totals): they make the table 1M rows
    // deep without changing any balance. The user asked for has its month of real usage from the runs above.
    if (db.kind === 'postgres') await db.exec('analyze usage_logs');
    const [{ n: total }] = await db.query<{ n: number | string }>('select count(*) as n from usage_logs');
    const [{ n: mine }] = await db.query<{ n: number | string }>(`select count(*) as n from usage_logs where user_id = 7 and status <> 'REJECTED'`);
    const summaryLatencies: Record<string, number[]> = { SERVICE: [], DAY: [] };
    const G = usagePb.UsageSummaryGroupBy;
    for (let i = 0; i < 200; i++) {
      for (const [name, groupBy] of [
        ['SERVICE', G.USAGE_SUMMARY_GROUP_BY_SERVICE],
        ['DAY', G.USAGE_SUMMARY_GROUP_BY_DAY],
      ] as const) {
        const t = performance.now();
        await unary(usage, 'getUsageSummary', { userId: 7n, service: '', groupBy, startTime: new Date(MONTH_START), endTime: new Date(MONTH_START + MONTH_MS) });
        summaryLatencies[name].push(performance.now() - t);
      }
    }
    const s1 = sorted(summaryLatencies.SERVICE);
    const s2 = sorted(summaryLatencies.DAY);
    const summary = {
      tableRows: Number(total),
      userMonthRows: Number(mine),
      byServiceP50Ms: pct(s1, 50),
      byServiceP99Ms: pct(s1, 99),
      byDayP50Ms: pct(s2, 50),
      byDayP99Ms: pct(s2, 99),
    };
    usage.close();
    notes.push(`RecordUsage: ${RECORD_IN_FLIGHT} calls in flight; StreamUsage: ${STREAM_WINDOW} batches of 1,000 unanswered per stream; GetBalance one call at a time (then 2 ms) beside the streams, from its own thread`);
    return { rows, summary, notes };
  } finally {
    await svc.stop();
    await db.drop();
  }
}
