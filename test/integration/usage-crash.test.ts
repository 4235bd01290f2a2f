/**
 * A producer streams usage to the built service (dist/) and the service is
 * killed with SIGKILL at a seeded moment while batches are in flight. After a
 * restart on the same database the producer resends every batch it got no
 * answer for: every event is then stored exactly once, each earlier answer
 * still holds (a batch answered ACCEPTED was durable), the billing run bills
 * each event once, and the invariant checker passes.
 *
 * Seeds: CRASH_SEEDS=5,8 npx jest test/integration/usage-crash.test.ts
 */
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as billingPb from '../../generated/billing/v1/billing_service';
import { openDatabase } from '../../src/db/database';
import { checkInvariants } from '../../src/ops/invariants';
import { call, money } from '../helpers/harness';
import { mulberry32 } from '../helpers/prng';
import { startServiceProcess, useProcessWorkspace } from '../helpers/service-process';
import { DEFAULT_PRICES, event, micros, priced, R, scaled, UsageStream } from '../helpers/usage-api';

const SEEDS = process.env.CRASH_SEEDS ? process.env.CRASH_SEEDS.split(',').map((s) => Number(s.trim())) : [3, 17, 29];
const BATCHES = 80;
const PER_BATCH = 250;
const USERS = 8;

describe('SIGKILL while a stream is sending, restart, resend what was not answered: every event once', () => {
  const ws = useProcessWorkspace('billing-usage-crash-');

  it.each(SEEDS)('seed %i', async (seed) => {
    const { dir, db, running } = ws;
    const rand = mulberry32(seed);
    const env = { GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off', LOG_FILE_PATH: path.join(dir, 'none.ndjson'), LOG_LEVEL: 'info' };
    let svc = await startServiceProcess(env);
    running.push(svc);
    const userIds: bigint[] = [];
    for (let i = 0; i < USERS; i++) {
      const { user } = await call(svc.users, 'createUser', { email: `p${i}@example.com`, name: `P${i}`, requestId: `u-${i}` });
      await call(svc.wallets, 'addFunds', { userId: user!.id, amount: money('100000'), requestId: `f-${i}` });
      userIds.push(user!.id);
    }
    const services = Object.keys(DEFAULT_PRICES);
    const batches = Array.from({ length: BATCHES }, (_, b) => ({
      id: `s${seed}-b${b}`,
      events: Array.from({ length: PER_BATCH }, (_, i) =>
        event(
          `s${seed}-${b}-${i}`,
          userIds[Math.floor(rand() * USERS)],
          services[Math.floor(rand() * services.length)],
          `${Math.floor(rand() * 100)}.${String(Math.floor(rand() * 1000)).padStart(3, '0')}`,
          new Date(Date.UTC(2026, 10, 1) + Math.floor(rand() * 20 * 86_400_000)),
        ),
      ),
    }));
    const killAfterAcks = 1 + Math.floor(rand() * 30);
    const killDelayMs = Math.floor(rand() * 20);
    const ctx = { seed, kill: `${killDelayMs} ms after ${killAfterAcks} answered batches` };

    // ---- stream everything, several batches in flight, and kill the service mid-way ----
    const answers = new Map<string, usagePb.UsageEventResult[]>();
    let killed = false;
    const first = new UsageStream(svc.usage, {
      onAck: (ack) => {
        answers.set(ack.batchId, ack.results);
        if (answers.size === killAfterAcks && !killed) {
          killed = true;
          setTimeout(() => svc.child.kill('SIGKILL'), killDelayMs);
        }
      },
    });
    for (const b of batches) if (!(await first.send(b.id, b.events))) break;
    first.end();
    const status = await first.done;
    const { signal } = await svc.exit;
    expect({ ...ctx, signal, streamOk: status.code === grpc.status.OK }).toEqual({ ...ctx, signal: 'SIGKILL', streamOk: false });
    svc.close();
    // Answered before the kill: all ACCEPTED (nothing was sent twice yet).
    for (const [id, results] of answers) {
      expect({ ...ctx, id, statuses: [...new Set(results.map((r) => r.status))] }).toEqual({ ...ctx, id, statuses: [R.USAGE_EVENT_STATUS_ACCEPTED] });
    }

    // ---- restart, resend every batch without an answer ----
    svc = await startServiceProcess(env);
    running.push(svc);
    const unanswered = batches.filter((b) => !answers.has(b.id));
    expect(unanswered.length).toBeGreaterThan(0);
    const again = new UsageStream(svc.usage);
    for (const b of unanswered) await again.send(b.id, b.events);
    again.end();
    expect({ ...ctx, code: (await again.done).code }).toEqual({ ...ctx, code: grpc.status.OK });
    for (const ack of again.acks) answers.set(ack.batchId, ack.results);
    expect(answers.size).toBe(BATCHES);

    // ---- every event stored once, under the id its answer gave ----
    const stored = new Map<string, bigint>();
    for (let pageToken = ''; ; ) {
      const res = await call(svc.billing, 'listUsageLogs', { userId: 0n, status: 0, source: 0, pageSize: 500, pageToken });
      for (const l of res.usageLogs) {
        expect({ ...ctx, dup: stored.has(l.eventId) }).toEqual({ ...ctx, dup: false });
        stored.set(l.eventId, l.id);
      }
      if ((pageToken = res.nextPageToken) === '') break;
    }
    expect({ ...ctx, stored: stored.size }).toEqual({ ...ctx, stored: BATCHES * PER_BATCH });
    for (const b of batches) {
      for (const [i, r] of answers.get(b.id)!.entries()) {
        const e = b.events[i];
        // Resent events that had been committed before the kill are DUPLICATE, the others ACCEPTED; either way the stored id.
        if (r.status !== R.USAGE_EVENT_STATUS_DUPLICATE) expect({ ...ctx, id: e.id, status: r.status }).toEqual({ ...ctx, id: e.id, status: R.USAGE_EVENT_STATUS_ACCEPTED });
        expect({ ...ctx, id: e.id, usageId: r.usageId }).toEqual({ ...ctx, id: e.id, usageId: stored.get(e.id) });
      }
    }

    // ---- billed once: each user's records equal the reference of their usage ----
    const run = (await call(svc.jobs, 'processLogs', {}, { deadlineMs: 120_000 })).jobRun!;
    expect(run.billingRecordsCreated).toBe(BigInt(USERS));
    const { billingRecords } = await call(svc.billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 100, pageToken: '' });
    const reference = new Map<string, bigint>();
    for (const b of batches) for (const e of b.events) reference.set(`${e.userId}/${e.service}`, (reference.get(`${e.userId}/${e.service}`) ?? 0n) + scaled(e.quantity));
    for (const r of billingRecords) {
      expect(r.status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
      const want = [...reference].filter(([k]) => k.startsWith(`${r.userId}/`)).reduce((sum, [k, q]) => sum + priced(q, DEFAULT_PRICES[k.split('/')[1]]), 0n);
      expect({ ...ctx, user: r.userId, amount: micros(r.amount) }).toEqual({ ...ctx, user: r.userId, amount: want });
      const balance = await call(svc.wallets, 'getBalance', { userId: r.userId });
      expect(micros(balance.availableBalance)).toBe(micros(balance.balance));
    }
    const side = await openDatabase(dbConfig(env), pino({ level: 'silent' }), { migrate: false });
    try {
      expect({ ...ctx, violations: (await checkInvariants(side)).violations }).toEqual({ ...ctx, violations: [] });
    } finally {
      await side.close();
    }
  });
});

/** The database the service process uses, from its environment. */
function dbConfig(env: Record<string, string>): Parameters<typeof openDatabase>[0] {
  return env.DATABASE_URL ? { kind: 'postgresql', url: env.DATABASE_URL } : { kind: 'sqlite', path: env.DB_PATH };
}
