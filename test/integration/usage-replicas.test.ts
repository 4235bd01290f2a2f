/**
 * Three replicas on one PostgreSQL database receive the same usage at the
 * same moment (RecordUsage and StreamUsage): each event is stored once, one
 * answer per event is ACCEPTED and every other one DUPLICATE with the same
 * usage id, the available balance counts each event once, and one billing
 * run bills each once.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as usagePb from '../../generated/billing/v1/usage_service';
import { checkInvariants } from '../../src/ops/invariants';
import { createTestDatabase, onPostgres, type TestDatabase } from '../helpers/database';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { DEFAULT_PRICES, event, micros, priced, R, recordUsage, scaled, UsageStream } from '../helpers/usage-api';

(onPostgres ? describe : describe.skip)('usage sent to three replicas at once', () => {
  let dir: string;
  let db: TestDatabase;
  let apps: TestApp[] = [];
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-usage-replicas-'));
    db = await createTestDatabase(dir);
    apps = await Promise.all(
      Array.from({ length: 3 }, () => startTestApp({ ...db.env, LOG_FILE_PATH: path.join(dir, 'usage.ndjson') }, { scheduler: false })),
    );
  });
  afterEach(async () => {
    for (const a of apps) await a.app.stop();
    apps = [];
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('records each event once: one ACCEPTED, the other answers DUPLICATE with its id; billed once', async () => {
    const users: bigint[] = [];
    for (let i = 0; i < 4; i++) {
      const { user } = await call(apps[0].users, 'createUser', { email: `r${i}@example.com`, name: 'R', requestId: '' });
      await call(apps[0].wallets, 'addFunds', { userId: user!.id, amount: money('10000'), requestId: '' });
      users.push(user!.id);
    }
    const services = ['api-calls', 'storage', 'compute'];
    const batches = Array.from({ length: 24 }, (_, b) =>
      Array.from({ length: 200 }, (_, i) => event(`rep-${b}-${i}`, users[(b + i) % 4], services[i % 3], `${(i % 7) + 1}.5`)),
    );
    // Every replica gets every batch, at the same moment; half through RecordUsage, half through one stream each.
    const answers = await Promise.all(
      apps.map(async (a) => {
        const got: usagePb.UsageEventResult[][] = [];
        const stream = new UsageStream(a.usage);
        const order = batches.map((_, b) => b); // the same batch to every replica at the same moment
        await Promise.all([
          (async () => {
            for (const b of order.filter((x) => x % 2 === 0)) got[b] = await recordUsage(a.usage, batches[b]);
          })(),
          (async () => {
            const streamed = order.filter((x) => x % 2 === 1);
            for (const b of streamed) await stream.send(String(b), batches[b]);
            stream.end();
            expect((await stream.done).code).toBe(grpc.status.OK);
            for (const ack of stream.acks) got[Number(ack.batchId)] = ack.results;
          })(),
        ]);
        return got;
      }),
    );
    for (const [b, events] of batches.entries()) {
      for (const [i, e] of events.entries()) {
        const results = answers.map((got) => got[b][i]);
        const accepted = results.filter((r) => r.status === R.USAGE_EVENT_STATUS_ACCEPTED);
        const duplicates = results.filter((r) => r.status === R.USAGE_EVENT_STATUS_DUPLICATE);
        expect({ id: e.id, accepted: accepted.length, duplicates: duplicates.length }).toEqual({ id: e.id, accepted: 1, duplicates: 2 });
        expect({ id: e.id, ids: new Set(results.map((r) => r.usageId)).size }).toEqual({ id: e.id, ids: 1 });
      }
    }
    // Each replica tells the same available balance: each event counted once.
    const owed = new Map<bigint, bigint>();
    const totals = new Map<string, bigint>();
    for (const e of batches.flat()) totals.set(`${e.userId}/${e.service}`, (totals.get(`${e.userId}/${e.service}`) ?? 0n) + scaled(e.quantity));
    for (const [key, q] of totals) {
      const [user, service] = key.split('/');
      owed.set(BigInt(user), (owed.get(BigInt(user)) ?? 0n) + priced(q, DEFAULT_PRICES[service]));
    }
    for (const u of users) {
      for (const a of apps) {
        const b = await call(a.wallets, 'getBalance', { userId: u });
        expect({ user: u, available: micros(b.availableBalance) }).toEqual({ user: u, available: 10_000_000_000n - owed.get(u)! });
      }
    }
    // Triggered on every replica at once: one run bills it all, once.
    await Promise.all(apps.map((a) => call(a.jobs, 'processLogs', {}, { deadlineMs: 60_000 })));
    const { billingRecords } = await call(apps[1].billing, 'listBillingRecords', { userId: 0n, status: 0, pageSize: 100, pageToken: '' });
    expect(billingRecords.map((r) => [r.userId, micros(r.amount)]).sort()).toEqual(users.map((u) => [u, owed.get(u)!]).sort());
    expect((await checkInvariants(apps[2].app.db)).violations).toEqual([]);
  });
});
