/**
 * Crash recovery: the built service (dist/, built by `npm test`) is killed with
 * SIGKILL at a seeded moment while it ingests a usage file, charges and
 * retries, then restarted on the same database and driven to the end. Nothing
 * may be lost or done twice: the invariant checker passes (its event rules
 * included: every change has its event, and no event lacks its change), every
 * entry of the file is stored exactly once, and replayed request_ids never
 * credit twice (nor write a second event).
 *
 * Seeds: CRASH_SEEDS=1234,99 npx jest test/integration/crash.test.ts
 * Every assertion carries the seed and the kill moment so a failure reproduces.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import type { DatabaseConfig } from '../../src/config';
import { openDatabase, type Database } from '../../src/db/database';
import { checkInvariants } from '../../src/ops/invariants';
import { eventSummary } from '../helpers/events';
import { call, money } from '../helpers/harness';
import { startServiceProcess, useProcessWorkspace, type ServiceProcess } from '../helpers/service-process';
import { mulberry32 } from '../helpers/prng';

const DEFAULT_SEEDS = [11, 23, 37, 41, 59, 73];
const SEEDS = process.env.CRASH_SEEDS
  ? process.env.CRASH_SEEDS.split(',').map((s) => Number(s.trim()))
  : DEFAULT_SEEDS;


const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const micros = (m?: { units: bigint; nanos: number }) => m!.units * 1_000_000n + BigInt(m!.nanos / 1000);

const SERVICES = ['api-calls', 'storage', 'bandwidth', 'compute'];
const USERS = 50;
const UNKNOWN_USER = 100_000;

interface UsageFile {
  partA: string[];
  partB: string[];
  expected: { BILLED: number; PENDING: number; REJECTED: number };
}

/** A seeded NDJSON usage file in two parts, and how many rows of each status it must leave. */
function usageFile(rand: () => number, seed: number, userIds: number[]): UsageFile {
  const lines: string[] = [];
  const expected = { BILLED: 0, PENDING: 0, REJECTED: 0 };
  const valid: string[] = [];
  const pick = <T>(xs: T[]) => xs[Math.floor(rand() * xs.length)];
  for (let k = 0; k < 3500; k++) {
    const r = rand();
    const base = {
      userId: pick(userIds),
      service: pick(SERVICES),
      quantity: rand() < 0.8 ? 1 + Math.floor(rand() * 40) : (rand() * 10).toFixed(3),
      timestamp: new Date(Date.UTC(2025, 0, 1) + Math.floor(rand() * 3e10)).toISOString(),
    };
    if (r < 0.83) {
      const line = JSON.stringify({ ...base, id: `s${seed}-${k}` });
      lines.push(line);
      valid.push(line);
      expected.BILLED++;
    } else if (r < 0.86 && valid.length > 0) {
      lines.push(pick(valid)); // the same event again (same id): stored once
    } else if (r < 0.89) {
      // No id: identified by content and occurrence, so each line is a usage of its own.
      lines.push(JSON.stringify({ ...base, quantity: 1 + (k % 3) }));
      expected.BILLED++;
    } else if (r < 0.92) {
      lines.push(JSON.stringify({ ...base, userId: UNKNOWN_USER, id: `s${seed}-${k}` }));
      expected.PENDING++;
    } else if (r < 0.94) {
      lines.push(JSON.stringify({ ...base, service: 'gpu', id: `s${seed}-${k}` }));
      expected.PENDING++;
    } else if (r < 0.97) {
      lines.push(JSON.stringify({ ...base, quantity: -1 - (k % 5) }));
      expected.REJECTED++;
    } else {
      lines.push(`{"userId": ${base.userId}, "service": "storage", "quantity": ${k}`); // cut short
      expected.REJECTED++;
    }
  }
  return { partA: lines.slice(0, 2000), partB: lines.slice(2000), expected };
}

/** Sends the items `width` at a time, in order, until `stop` says so. */
async function inPool<T>(items: T[], width: number, stop: () => boolean, send: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (!stop() && next < items.length) await send(items[next++]);
    }),
  );
}

/** An NDJSON file of `n` entries with ids `<prefix>-<k>`, round robin over `userIds` and the services. */
function writeIdFile(file: string, prefix: string, n: number, userIds: number[]): void {
  const lines = Array.from({ length: n }, (_, k) =>
    JSON.stringify({ id: `${prefix}-${k}`, userId: userIds[k % userIds.length], service: SERVICES[k % 4], quantity: 1 + (k % 9), timestamp: '2025-03-01T00:00:00Z' }),
  );
  fs.writeFileSync(file, lines.join('\n') + '\n');
}

/** AddFunds one after another to the first 20 users until stopped (failures ignored: the service may be killed). */
function keepCrediting(svc: ServiceProcess, userIds: number[]): { stop(): Promise<void> } {
  let stop = false;
  const credits = (async () => {
    for (let i = 0; !stop; i++) {
      await call(svc.wallets, 'addFunds', { userId: BigInt(userIds[i % 20]), amount: money('0.01'), requestId: `c-${i}` }).catch(() => undefined);
    }
  })();
  return {
    async stop() {
      stop = true;
      await credits;
    },
  };
}

/** The invariant checker's report on `side`, expected clean (`ctx` names the seed), and the events by type. */
async function expectClean(side: Database, ctx: object) {
  const report = await checkInvariants(side);
  expect({ ...ctx, violations: report.violations }).toEqual({ ...ctx, violations: [] });
  return { report, ...(await eventSummary(side)) };
}

/** Stops a service process with SIGTERM and waits for it to exit. */
async function stopService(svc: ServiceProcess): Promise<void> {
  svc.close();
  svc.child.kill('SIGTERM');
  await svc.exit;
}

/** A service process on the workspace's database, the cron off, its usage file `usage.ndjson` in the workspace. */
async function startIngesting(ws: ReturnType<typeof useProcessWorkspace>) {
  const file = path.join(ws.dir, 'usage.ndjson');
  const env = { GRPC_PORT: '0', ...ws.db.env, INGEST_CRON: 'off', LOG_FILE_PATH: file, LOG_LEVEL: 'info' };
  const config: DatabaseConfig = ws.db.env.DATABASE_URL ? { kind: 'postgresql', url: ws.db.env.DATABASE_URL } : { kind: 'sqlite', path: ws.db.env.DB_PATH };
  const svc = await startServiceProcess(env);
  ws.running.push(svc);
  return { file, env, config, svc };
}

type Outcome = { ok: true; value: string } | { ok: false; code: grpc.status | 'NOT_SENT' };

describe('SIGKILL at a seeded moment, restart, finish: nothing lost, nothing twice', () => {
  const ws = useProcessWorkspace('billing-crash-');

  it.each(SEEDS)('seed %i', async (seed) => {
    const { dir, db, running } = ws;
    const rand = mulberry32(seed);
    const between = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
    const file = path.join(dir, 'usage.ndjson');
    const env = {
      GRPC_PORT: '0',
      ...db.env,
      INGEST_CRON: 'off',
      LOG_FILE_PATH: file,
      RETRY_BASE_DELAY_MS: '20',
      MAX_RETRIES: '3',
      LOG_LEVEL: 'info',
    };

    // ---- set-up: users and opening balances, all acknowledged ----------------
    let svc = await startServiceProcess(env);
    running.push(svc);
    const userIds: number[] = [];
    const credits = new Map<string, { userId: number; amount: bigint }>();
    const openings: { requestId: string; userId: bigint; amount: ReturnType<typeof money> }[] = [];
    for (let i = 0; i < USERS; i++) {
      // In order, so that a seed always gives user i the same id.
      const { user } = await call(svc.users, 'createUser', { email: `c${i}@example.com`, name: `C${i}`, requestId: `u-${i}` });
      userIds.push(Number(user!.id));
      // A third of the users start short; the rest can pay for a good part of their usage.
      const amount = money(i % 3 === 0 ? `${between(0, 3)}.5` : `${between(20, 120)}`);
      openings.push({ requestId: `open-${i}`, userId: user!.id, amount });
      credits.set(`open-${i}`, { userId: Number(user!.id), amount: micros(amount) });
    }
    await Promise.all(openings.map((o) => call(svc.wallets, 'addFunds', o)));
    const usage = usageFile(rand, seed, userIds);
    fs.writeFileSync(file, usage.partA.join('\n') + '\n');
    /** Appends part B the way a log shipper should: a complete file renamed into place. */
    let appended = false;
    const appendPartB = () => {
      if (appended) return;
      appended = true;
      fs.writeFileSync(`${file}.tmp`, [...usage.partA, ...usage.partB].join('\n') + '\n');
      fs.renameSync(`${file}.tmp`, file);
    };

    // ---- the plan: request_id'd top-ups and manual records --------------------
    const topUps = Array.from({ length: 150 }, (_, i) => ({
      requestId: `t-${i}`,
      userId: userIds[between(0, USERS - 1)],
      amount: money(`${between(1, 30)}`),
    }));
    const manual = Array.from({ length: 60 }, (_, i) => ({
      requestId: `m-${i}`,
      userId: userIds[between(0, USERS - 1)],
      amount: money(`${between(1, 20)}.25`),
      description: `manual ${i}`,
    }));
    const topUpOutcome = new Map<string, Outcome>(topUps.map((t) => [t.requestId, { ok: false, code: 'NOT_SENT' }]));
    const manualOutcome = new Map<string, Outcome>(manual.map((m) => [m.requestId, { ok: false, code: 'NOT_SENT' }]));

    // ---- the kill moment -------------------------------------------------------
    const phase = (['ingest', 'charging', 'retries'] as const)[between(0, 2)];
    const killAfterLogs = between(1, 2); // 'ingest': after the n-th ProcessLogs is sent ...
    const killAfterResponses = between(5, 150); // 'charging': after n answered money calls ...
    const killDelayMs = phase === 'ingest' ? between(0, 250) : phase === 'charging' ? between(0, 10) : between(0, 150);
    const ctx = {
      seed,
      kill: phase === 'ingest' ? `${killDelayMs} ms after ProcessLogs #${killAfterLogs} was sent` : phase === 'charging'
        ? `${killDelayMs} ms after ${killAfterResponses} answered money calls` : `${killDelayMs} ms after the traffic ended`,
    };

    let killed = false;
    let killTimer: NodeJS.Timeout | undefined;
    const killAt = (ms: number) => {
      if (killed || killTimer) return;
      killTimer = setTimeout(() => {
        killed = true;
        svc.child.kill('SIGKILL');
      }, ms);
    };

    // ---- chaos: ingestion, top-ups, manual records and manual charges at once --
    let logsSent = 0;
    let answered = 0;
    const ingestLoop = async () => {
      for (let round = 0; round < 4 && !killed; round++) {
        if (round === 1) appendPartB();
        logsSent++;
        const pending = call(svc.jobs, 'processLogs', {}, { deadlineMs: 30_000 }).catch(() => undefined);
        if (phase === 'ingest' && logsSent === killAfterLogs) killAt(killDelayMs);
        await pending;
      }
    };
    const record = (outcomes: Map<string, Outcome>, id: string, p: Promise<string>) =>
      p.then(
        (value) => {
          outcomes.set(id, { ok: true, value });
          if (phase === 'charging' && ++answered === killAfterResponses) killAt(killDelayMs);
        },
        (err: grpc.ServiceError) => void outcomes.set(id, { ok: false, code: err.code }),
      );
    const topUpLoop = () =>
      inPool(topUps, 6, () => killed, (t) =>
        record(
          topUpOutcome,
          t.requestId,
          call(svc.wallets, 'addFunds', { userId: BigInt(t.userId), amount: t.amount, requestId: t.requestId }).then((r) =>
            `${r.transaction!.id}:${micros(r.transaction!.balanceAfter)}`,
          ),
        ),
      );
    const manualLoop = () =>
      inPool(manual, 3, () => killed, (m) =>
        record(
          manualOutcome,
          m.requestId,
          call(svc.billing, 'createBillingRecord', {
            userId: BigInt(m.userId),
            amount: m.amount,
            description: m.description,
            requestId: m.requestId,
          }).then((r) => String(r.billingRecord!.id)),
        ),
      );
    const chargeLoop = () =>
      inPool(
        Array.from({ length: 80 }, () => between(1, 120)),
        2,
        () => killed,
        (id) => call(svc.billing, 'processBillingRecord', { id: BigInt(id) }).then(() => undefined, () => undefined),
      );
    await Promise.all([ingestLoop(), topUpLoop(), manualLoop(), chargeLoop()]);
    killAt(killDelayMs); // 'retries', or a planned moment the traffic never reached
    const { signal } = await svc.exit;
    expect({ ...ctx, signal }).toEqual({ ...ctx, signal: 'SIGKILL' });
    svc.close();

    // ---- restart on the same database and finish everything --------------------
    svc = await startServiceProcess(env);
    running.push(svc);
    appendPartB();
    // Every unanswered call is retried with its request_id; a few answered ones are replayed too (chosen in plan order).
    const replays: { requestId: string; first: string; again: string }[] = [];
    const again = [
      ...topUps.map((t) => ({
        first: topUpOutcome.get(t.requestId)!,
        requestId: t.requestId,
        send: () =>
          call(svc.wallets, 'addFunds', { userId: BigInt(t.userId), amount: t.amount, requestId: t.requestId }).then(
            (res) => `${res.transaction!.id}:${micros(res.transaction!.balanceAfter)}`,
          ),
      })),
      ...manual.map((m) => ({
        first: manualOutcome.get(m.requestId)!,
        requestId: m.requestId,
        send: () =>
          call(svc.billing, 'createBillingRecord', { userId: BigInt(m.userId), amount: m.amount, description: m.description, requestId: m.requestId }).then(
            (res) => String(res.billingRecord!.id),
          ),
      })),
    ].filter((x) => !x.first.ok || rand() <= 0.15);
    await inPool(again, 8, () => false, async (x) => {
      const value = await x.send();
      if (x.first.ok) replays.push({ requestId: x.requestId, first: x.first.value, again: value });
    });
    // A replay answers what the first call answered.
    expect({ ...ctx, replays }).toEqual({ ...ctx, replays: replays.map((r) => ({ ...r, again: r.first })) });

    const run = (await call(svc.jobs, 'processLogs', {}, { deadlineMs: 30_000 })).jobRun!;
    expect({ ...ctx, status: jobPb.JobRunStatus[run.status] }).toEqual({ ...ctx, status: 'JOB_RUN_STATUS_SUCCEEDED' });
    // Retries are 20, 40 and 80 ms apart: within a few seconds every record is PAID or FAILED.
    let pending = -1;
    for (let round = 0; round < 200; round++) {
      await call(svc.jobs, 'processRetries', {});
      const { billingRecords } = await call(svc.billing, 'listBillingRecords', {
        userId: 0n,
        status: billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PENDING,
        pageSize: 1,
        pageToken: '',
      });
      pending = billingRecords.length;
      if (pending === 0) break;
      await sleep(25);
    }
    expect({ ...ctx, pending }).toEqual({ ...ctx, pending: 0 });
    svc.close();
    svc.child.kill('SIGTERM');
    const stopped = await svc.exit;
    expect({ ...ctx, exit: stopped }).toEqual({ ...ctx, exit: { code: 0, signal: null } });

    // ---- what the database says ------------------------------------------------
    const config: DatabaseConfig = db.env.DATABASE_URL
      ? { kind: 'postgresql', url: db.env.DATABASE_URL }
      : { kind: 'sqlite', path: db.env.DB_PATH };
    const side = await openDatabase(config, pino({ level: 'silent' }), { migrate: false });
    try {
      const em = side.fork();
      // The event rules held over something: one event per ledger row, and per record created and settled.
      const { report, byType, increasing } = await expectClean(side, ctx);
      const c = report.counts;
      expect({ ...ctx, increasing, credited: byType['wallet.credited'], debited: byType['wallet.debited'] }).toEqual({
        ...ctx,
        increasing: true,
        credited: c.credits,
        debited: c.debits,
      });
      const recordCount = c.billingRecords.PAID + c.billingRecords.PENDING + c.billingRecords.FAILED;
      expect({ ...ctx, created: byType['billing_record.created'], paid: byType['billing_record.paid'] }).toEqual({
        ...ctx,
        created: recordCount,
        paid: c.billingRecords.PAID,
      });
      // The killed run (closed at the restart, or by its lease) and the ones after it.
      expect({ ...ctx, runsFinished: (byType['job_run.finished'] ?? 0) >= 2 }).toEqual({ ...ctx, runsFinished: true });

      // Every entry of the file stored exactly once, each in the state it must be in.
      expect({ ...ctx, usage: report.counts.usageLogs }).toEqual({ ...ctx, usage: usage.expected });

      // Every request_id'd credit exactly once, for its amount, and no credit without one.
      for (const t of topUps) credits.set(t.requestId, { userId: t.userId, amount: micros(t.amount) });
      const rows = await em.execute<{ request_id: string | null; user_id: number | string; amount: string }[]>(
        `select request_id, user_id, cast(amount as text) as amount from wallet_transactions where type = 'CREDIT' order by id`,
      );
      const seen = rows.map((r) => `${r.request_id}:${Number(r.user_id)}:${r.amount}`).sort();
      const planned = [...credits].map(([id, c]) => `${id}:${c.userId}:${c.amount}`).sort();
      expect({ ...ctx, credits: seen }).toEqual({ ...ctx, credits: planned });

      // Every request_id'd manual record exactly once.
      const records = await em.execute<{ description: string; n: number | string }[]>(
        `select description, count(*) as n from billing_records where kind = 'MANUAL' group by description`,
      );
      expect({ ...ctx, manual: records.map((r) => `${r.description}:${Number(r.n)}`).sort() }).toEqual({
        ...ctx,
        manual: manual.map((m) => `${m.description}:1`).sort(),
      });
    } finally {
      await side.close();
    }
  });
});

/**
 * The ingestion of a file commits in chunks while other writes wait. A kill
 * right after the k-th chunk became visible, or a few ms into the next one,
 * must leave a database the invariant checker accepts as it is (a run caught
 * storing its rows is not a violation), and the next run must roll the dead
 * run back and bill every entry exactly once.
 */
describe('SIGKILL at an ingestion chunk boundary, restart, ingest again: every entry billed once', () => {
  const ws = useProcessWorkspace('billing-chunks-');

  it.each(SEEDS)('seed %i', async (seed) => {
    const { running } = ws;
    const rand = mulberry32(seed);
    const between = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
    const started = await startIngesting(ws);
    const { file, env, config } = started;
    let svc = started.svc;
    const userIds: number[] = [];
    for (let i = 0; i < 20; i++) {
      const { user } = await call(svc.users, 'createUser', { email: `b${i}@example.com`, name: `B${i}`, requestId: `u-${i}` });
      await call(svc.wallets, 'addFunds', { userId: user!.id, amount: money('1000'), requestId: `open-${i}` });
      userIds.push(Number(user!.id));
    }
    const N = 20_000;
    writeIdFile(file, `b${seed}`, N, userIds);

    const afterChunks = between(1, 4);
    const extraMs = rand() < 0.5 ? 0 : between(1, 15); // right at the boundary, or a little into the next chunk
    const ctx = { seed, kill: `${extraMs} ms after chunk ${afterChunks} became visible` };

    const side = await openDatabase(config, pino({ level: 'silent' }), { migrate: false });
    try {
      // Credits keep arriving, so the run commits a chunk each time one waits.
      const credits = keepCrediting(svc, userIds);
      void call(svc.jobs, 'processLogs', {}, { deadlineMs: 60_000 }).catch(() => undefined);
      let visible = 0;
      let chunks = 0;
      for (const until = Date.now() + 30_000; Date.now() < until && chunks < afterChunks && visible < N; ) {
        const [{ n }] = await side.fork().execute<{ n: number | string }[]>('select count(*) as n from usage_logs');
        if (Number(n) > visible) {
          visible = Number(n);
          chunks++;
        } else {
          await sleep(1);
        }
      }
      if (extraMs) await sleep(extraMs);
      svc.child.kill('SIGKILL');
      const stopped = credits.stop();
      await svc.exit;
      await stopped;
      svc.close();

      // As the crash left it: a run caught storing its rows is not a violation.
      const atCrash = await checkInvariants(side);
      expect({ ...ctx, visible, violations: atCrash.violations }).toEqual({ ...ctx, visible, violations: [] });

      // Restart and ingest again: the dead run is rolled back, every entry billed once.
      svc = await startServiceProcess(env);
      running.push(svc);
      const run = (await call(svc.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;
      expect({ ...ctx, status: jobPb.JobRunStatus[run.status] }).toEqual({ ...ctx, status: 'JOB_RUN_STATUS_SUCCEEDED' });
      const em = side.fork();
      const [{ billed, keys }] = await em.execute<{ billed: number | string; keys: number | string }[]>(
        `select count(*) as billed, count(distinct dedup_key) as keys from usage_logs where status = 'BILLED'`,
      );
      expect({ ...ctx, billed: Number(billed), keys: Number(keys) }).toEqual({ ...ctx, billed: N, keys: N });
      const [{ staging }] = await em.execute<{ staging: number | string }[]>('select count(*) as staging from billing_records where staging = ?', [true]);
      expect({ ...ctx, staging: Number(staging) }).toEqual({ ...ctx, staging: 0 });
      const states = await em.execute<{ state: string }[]>('select state from usage_runs order by job_run_id');
      expect({ ...ctx, states: states.map((s) => s.state) }).toEqual({
        ...ctx,
        // The killed run sealed if the kill came after its last chunk; else it was rolled back.
        states: states.length === 2 && states[0].state === 'SEALED' ? ['SEALED', 'SEALED'] : ['ROLLED_BACK', 'SEALED'],
      });
      const { report, byType } = await expectClean(side, ctx);
      expect({ ...ctx, credited: byType['wallet.credited'], created: byType['billing_record.created'] }).toEqual({
        ...ctx,
        credited: report.counts.credits,
        created: report.counts.billingRecords.PAID + report.counts.billingRecords.PENDING + report.counts.billingRecords.FAILED,
      });
      await stopService(svc);
    } finally {
      await side.close();
    }
  });
});

/**
 * A run that has read its file is decided, and seals its records a group at a
 * time (so no write waits for all of them). A kill while it seals them must
 * leave a database the invariant checker accepts (some records sealed, the
 * rest staging), and the next run must finish the dead one: every record
 * sealed once with its event, every entry billed once, nothing rolled back.
 */
describe('SIGKILL while a run seals its records, restart, ingest again: the dead run is finished, every record sealed once', () => {
  const ws = useProcessWorkspace('billing-seal-');
  /** Enough users that sealing their records takes several groups (SEAL_RECORDS = 500) while credits wait. */
  const SEAL_USERS = 1600;
  const SEAL_SEEDS = SEEDS.slice(0, 3);
  /** Seeds whose kill found the run SEALING with records still staging (the finish path really ran). */
  const caught: number[] = [];

  it.each(SEAL_SEEDS)('seed %i', async (seed) => {
    const { running } = ws;
    const rand = mulberry32(seed);
    const started = await startIngesting(ws);
    const { file, env, config } = started;
    let svc = started.svc;
    const userIds: number[] = [];
    await inPool(
      Array.from({ length: SEAL_USERS }, (_, i) => i),
      32,
      () => false,
      async (i) => {
        const { user } = await call(svc.users, 'createUser', { email: `s${i}@example.com`, name: `S${i}`, requestId: `u-${i}` });
        await call(svc.wallets, 'addFunds', { userId: user!.id, amount: money('1000'), requestId: `open-${i}` });
        userIds.push(Number(user!.id));
      },
    );
    const N = SEAL_USERS * 2;
    writeIdFile(file, `z${seed}`, N, userIds);
    const extraMs = rand() < 0.5 ? 0 : 1 + Math.floor(rand() * 10);
    const ctx = { seed, kill: `${extraMs} ms after the run began sealing` };

    const side = await openDatabase(config, pino({ level: 'silent' }), { migrate: false });
    try {
      // Credits keep arriving, so each sealing transaction lets them in after a group.
      const credits = keepCrediting(svc, userIds);
      void call(svc.jobs, 'processLogs', {}, { deadlineMs: 60_000 }).catch(() => undefined);
      let state = '';
      for (const until = Date.now() + 30_000; Date.now() < until && state !== 'SEALING' && state !== 'SEALED'; ) {
        const rows = await side.fork().execute<{ state: string }[]>('select state from usage_runs');
        state = rows[0]?.state ?? '';
        if (state !== 'SEALING') await sleep(1);
      }
      if (extraMs) await sleep(extraMs);
      svc.child.kill('SIGKILL');
      const stopped = credits.stop();
      await svc.exit;
      await stopped;
      svc.close();

      const em = side.fork();
      const [{ state: atKill }] = await em.execute<{ state: string }[]>('select state from usage_runs');
      const [{ staging }] = await em.execute<{ staging: number | string }[]>('select count(*) as staging from billing_records where staging = ?', [true]);
      if (atKill === 'SEALING' && Number(staging) > 0) caught.push(seed);
      // As the crash left it: a run caught sealing (some records visible, the rest staging) is not a violation.
      const atCrash = await checkInvariants(side);
      expect({ ...ctx, atKill, staging: Number(staging), violations: atCrash.violations }).toEqual({ ...ctx, atKill, staging: Number(staging), violations: [] });
      expect({ ...ctx, decided: ['SEALING', 'SEALED'].includes(atKill) }).toEqual({ ...ctx, decided: true });

      // Restart and ingest again: the dead run is finished (not rolled back); the file is all duplicates now.
      svc = await startServiceProcess(env);
      running.push(svc);
      const run = (await call(svc.jobs, 'processLogs', {}, { deadlineMs: 60_000 })).jobRun!;
      expect({ ...ctx, status: jobPb.JobRunStatus[run.status], duplicates: Number(run.entriesDuplicate), records: Number(run.billingRecordsCreated) }).toEqual({
        ...ctx,
        status: 'JOB_RUN_STATUS_SUCCEEDED',
        duplicates: N,
        records: 0,
      });
      const states = await em.execute<{ state: string }[]>('select state from usage_runs order by job_run_id');
      expect({ ...ctx, states: states.map((s) => s.state) }).toEqual({ ...ctx, states: ['SEALED', 'SEALED'] });
      const [{ billed, keys }] = await em.execute<{ billed: number | string; keys: number | string }[]>(
        `select count(*) as billed, count(distinct dedup_key) as keys from usage_logs where status = 'BILLED'`,
      );
      expect({ ...ctx, billed: Number(billed), keys: Number(keys) }).toEqual({ ...ctx, billed: N, keys: N });
      const [{ records, unsealed }] = await em.execute<{ records: number | string; unsealed: number | string }[]>(
        `select count(*) as records, sum(case when staging then 1 else 0 end) as unsealed from billing_records where kind = 'USAGE'`,
      );
      expect({ ...ctx, records: Number(records), unsealed: Number(unsealed) }).toEqual({ ...ctx, records: SEAL_USERS, unsealed: 0 }); // one per user, all sealed
      const { byType } = await expectClean(side, ctx);
      expect({ ...ctx, created: byType['billing_record.created'] }).toEqual({ ...ctx, created: SEAL_USERS });
      await stopService(svc);
    } finally {
      await side.close();
    }
  });

  it('caught at least one run with records still staging, so the finishing path ran', () => {
    expect(caught.length).toBeGreaterThan(0);
  });
});
