/**
 * UsageService.StreamUsage against the running server: acks in order and
 * only after the batch is stored, flow control against a producer that does
 * not read, errors that end the stream, and resending after a broken stream.
 */
import * as http2 from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as billingPb from '../../generated/billing/v1/billing_service';
import { checkInvariants } from '../../src/ops/invariants';
import { call, money, startTestApp, type TestApp } from '../helpers/harness';
import { grpcFrame } from '../helpers/h2';
import { brief, event, micros, R, UsageStream } from '../helpers/usage-api';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function createUser(t: TestApp, n: number, funds = '0'): Promise<bigint> {
  const { user } = await call(t.users, 'createUser', { email: `s${n}@example.com`, name: `S${n}`, requestId: '' });
  if (funds !== '0') await call(t.wallets, 'addFunds', { userId: user!.id, amount: money(funds), requestId: '' });
  return user!.id;
}

/** How many usage entries are stored (through the usage summary of all users: billed and unbilled). */
async function storedCount(t: TestApp): Promise<number> {
  const { rows } = await call(t.usage, 'getUsageSummary', {
    userId: 0n,
    service: '',
    groupBy: 0,
    startTime: new Date('2026-01-01T00:00:00Z'),
    endTime: new Date('2026-12-31T00:00:00Z'),
  });
  return rows.reduce((n, r) => n + Number(r.entries), 0);
}

const batchOf = (userId: bigint, prefix: string, n: number, quantity = '1') => Array.from({ length: n }, (_, i) => event(`${prefix}-${i}`, userId, 'api-calls', quantity));

describe('StreamUsage', () => {
  let t: TestApp;
  afterEach(async () => t?.stop());

  it('answers each batch in order with its batch_id, sequence and results, only once its events are stored', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1, '100');
    const seenAtAck: { batch: string; stored: number; available: bigint }[] = [];
    let checks = Promise.resolve();
    // As each ack arrives, look at what is stored and at the available balance.
    const stream = new UsageStream(t.usage, {
      onAck: (ack) => {
        checks = checks.then(async () => {
          const b = await call(t.wallets, 'getBalance', { userId: u });
          seenAtAck.push({ batch: ack.batchId, stored: await storedCount(t), available: micros(b.availableBalance) });
        });
      },
    });
    for (let b = 0; b < 20; b++) await stream.send(`b${b}`, batchOf(u, `b${b}`, 50));
    stream.end();
    const status = await stream.done;
    await checks;
    expect(status.code).toBe(grpc.status.OK);
    expect(stream.acks.map((a) => a.batchId)).toEqual(Array.from({ length: 20 }, (_, b) => `b${b}`));
    // When batch b was answered, at least its events and all before it were stored and counted in the available balance.
    for (const [b, seen] of seenAtAck.entries()) {
      expect(seen.stored).toBeGreaterThanOrEqual((b + 1) * 50);
      expect(seen.available).toBeLessThanOrEqual(100_000_000n - BigInt((b + 1) * 50) * 10_000n);
    }
    expect(await storedCount(t)).toBe(1000);
  });

  it('answers a batch as soon as it is stored, while the stream stays open: a producer may wait for each ack', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    const stream = new UsageStream(t.usage);
    for (let b = 1; b <= 5; b++) {
      await stream.send(`one-${b}`, batchOf(u, `one-${b}`, 3));
      await stream.acked(b); // never resolves if acks wait for more batches or for the end of the stream
      expect(stream.acks[b - 1].batchId).toBe(`one-${b}`);
    }
    stream.end();
    expect((await stream.done).code).toBe(grpc.status.OK);
  });

  it('acks carry sequence numbers from 1 and the same per-event results as RecordUsage', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    const stream = new UsageStream(t.usage);
    await stream.send('first', [event('x', u, 'api-calls', '1'), event('', u, 'api-calls', '1'), event('y', 999, 'api-calls', '1')]);
    await stream.send('second', [event('x', u, 'api-calls', '1'), event('x', u, 'api-calls', '2'), event('z', u, 'api-calls', '-1')]);
    await stream.send('', []);
    stream.end();
    expect((await stream.done).code).toBe(grpc.status.OK);
    expect(stream.acks.map((a) => [a.batchId, a.sequence, a.results.length])).toEqual([
      ['first', 1n, 3],
      ['second', 2n, 3],
      ['', 3n, 0],
    ]);
    const x = stream.acks[0].results[0].usageId;
    expect(brief(stream.acks[0].results)).toEqual([
      ['ACCEPTED', x, ''],
      ['REJECTED', 0n, 'MISSING_ID'],
      ['PENDING', stream.acks[0].results[2].usageId, 'UNKNOWN_USER'],
    ]);
    expect(brief(stream.acks[1].results)).toEqual([
      ['DUPLICATE', x, ''],
      ['CONFLICT', x, 'EVENT_ID_REUSED'],
      ['REJECTED', 0n, 'NEGATIVE_QUANTITY'],
    ]);
  });

  it('a producer that does not read its acks is held back by flow control: the server stops storing ahead, and goes on once it reads', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    // A raw HTTP/2 client: grpc-js's own client keeps reading a stream nobody reads (it buffers every message), so
    // only a client that really stops reading shows what the server does then.
    const session = http2.connect(`http://${t.address}`);
    session.on('error', () => undefined);
    const req = session.request({ ':method': 'POST', ':path': '/billing.v1.UsageService/StreamUsage', 'content-type': 'application/grpc', te: 'trailers' });
    let trailers: http2.IncomingHttpHeaders = {};
    req.on('trailers', (h) => (trailers = h));
    req.on('error', () => undefined);
    const BATCHES = 120;
    for (let b = 0; b < BATCHES; b++) {
      req.write(grpcFrame(usagePb.StreamUsageRequest.encode({ batchId: `b${b}`, events: batchOf(u, `fc${b}`, 1000) }).finish()));
    }
    req.end();
    // Let the server work as far as it will while nobody reads its answers.
    let stored = -1;
    for (let i = 0; i < 100; i++) {
      await sleep(300);
      const now = await storedCount(t);
      if (now === stored) break;
      stored = now;
    }
    // Bounded: the unread acks fill the client's HTTP/2 window and the server's write buffers, then the server stops
    // reading batches (at 1000 events an ack is ~8 KB: a 64 KiB window holds ~8; 16 in grpc-js's buffer, 4 in work).
    expect(stored).toBeGreaterThan(0);
    expect(stored).toBeLessThan(60 * 1000);
    // Reading now, every batch is answered, in order.
    const closed = new Promise<void>((resolve) => req.on('close', () => resolve()));
    let pending = Buffer.alloc(0);
    const acks: usagePb.StreamUsageResponse[] = [];
    req.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 5 && pending.length >= 5 + pending.readUInt32BE(1)) {
        const size = pending.readUInt32BE(1);
        acks.push(usagePb.StreamUsageResponse.decode(pending.subarray(5, 5 + size)));
        pending = pending.subarray(5 + size);
      }
    });
    await closed;
    session.close();
    expect(trailers['grpc-status']).toBe('0');
    expect(acks.map((a) => a.batchId)).toEqual(Array.from({ length: BATCHES }, (_, b) => `b${b}`));
    expect(acks.every((a) => a.results.every((r) => r.status === R.USAGE_EVENT_STATUS_ACCEPTED))).toBe(true);
    expect(await storedCount(t)).toBe(BATCHES * 1000);
  });

  it('a batch over USAGE_BATCH_MAX ends the stream with INVALID_ARGUMENT/BATCH_TOO_LARGE after answering the batches before it', async () => {
    t = await startTestApp({ USAGE_BATCH_MAX: '10' }, { scheduler: false });
    const u = await createUser(t, 1);
    const stream = new UsageStream(t.usage);
    await stream.send('ok-1', batchOf(u, 'a', 10));
    await stream.acked(1);
    await stream.send('too-big', batchOf(u, 'b', 11));
    const status = await stream.done;
    expect({ code: grpc.status[status.code], reason: status.metadata.get('billing-error-reason') }).toEqual({
      code: 'INVALID_ARGUMENT',
      reason: ['BATCH_TOO_LARGE'],
    });
    expect(stream.acks.map((a) => a.batchId)).toEqual(['ok-1']);
    expect(await storedCount(t)).toBe(10);
  });

  it('a control character in batch_id ends the stream with INVALID_CHARACTERS; one in an event rejects only that event', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    const ok = new UsageStream(t.usage);
    await ok.send('clean', [event('bad\u0001id', u, 'api-calls', '1'), event('good', u, 'api\u0007calls', '1'), event('fine', u, 'api-calls', '1')]);
    ok.end();
    expect((await ok.done).code).toBe(grpc.status.OK);
    expect(brief(ok.acks[0].results).map(([s, , r]) => `${s}:${r}`)).toEqual(['REJECTED:INVALID_ID', 'REJECTED:INVALID_SERVICE', 'ACCEPTED:']);
    const bad = new UsageStream(t.usage);
    await bad.send('bad\u0000batch', [event('never', u, 'api-calls', '1')]);
    const status = await bad.done;
    expect({ code: grpc.status[status.code], reason: status.metadata.get('billing-error-reason'), field: status.metadata.get('billing-error-field') }).toEqual({
      code: 'INVALID_ARGUMENT',
      reason: ['INVALID_CHARACTERS'],
      field: ['batch_id'],
    });
    expect(await storedCount(t)).toBe(1);
  });

  it('after a broken stream the producer resends every unanswered batch on a new one: each event is recorded once', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1, '1000');
    const batches = Array.from({ length: 60 }, (_, b) => ({ id: `r${b}`, events: batchOf(u, `r${b}`, 100, `${(b % 4) + 1}`) }));
    const first = new UsageStream(t.usage);
    for (const b of batches.slice(0, 40)) void first.send(b.id, b.events);
    await first.acked(5);
    first.cancel(); // the connection breaks mid-stream
    await first.done;
    const answered = new Set(first.acks.map((a) => a.batchId));
    const again = new UsageStream(t.usage);
    for (const b of batches.filter((x) => !answered.has(x.id))) await again.send(b.id, b.events);
    again.end();
    expect((await again.done).code).toBe(grpc.status.OK);
    const results = again.acks.flatMap((a) => a.results);
    expect(results.every((r) => r.status === R.USAGE_EVENT_STATUS_ACCEPTED || r.status === R.USAGE_EVENT_STATUS_DUPLICATE)).toBe(true);
    const logs: billingPb.UsageLog[] = [];
    for (let pageToken = ''; ; ) {
      const res = await call(t.billing, 'listUsageLogs', { userId: 0n, status: 0, source: 0, pageSize: 500, pageToken });
      logs.push(...res.usageLogs);
      if ((pageToken = res.nextPageToken) === '') break;
    }
    expect(logs).toHaveLength(6000);
    expect(new Set(logs.map((l) => l.eventId)).size).toBe(6000);
    const owed = batches.reduce((sum, _, b) => sum + 100n * BigInt((b % 4) + 1), 0n) * 10_000n;
    expect(micros((await call(t.wallets, 'getBalance', { userId: u })).availableBalance)).toBe(1_000_000_000n - owed);
    expect((await checkInvariants(t.app.db)).violations).toEqual([]);
  });

  it('four streams at once, with overlapping events, record each event once', async () => {
    t = await startTestApp({}, { scheduler: false });
    const u = await createUser(t, 1);
    const streams = Array.from({ length: 4 }, () => new UsageStream(t.usage));
    // Every stream sends the same 30 batches, each starting at another one.
    await Promise.all(
      streams.map(async (s, k) => {
        for (let i = 0; i < 30; i++) {
          const b = (i + k * 7) % 30;
          await s.send(`o${b}`, batchOf(u, `o${b}`, 200));
        }
        s.end();
        expect((await s.done).code).toBe(grpc.status.OK);
      }),
    );
    const byEvent = new Map<bigint, number>();
    for (const s of streams) for (const a of s.acks) for (const r of a.results) if (r.status === R.USAGE_EVENT_STATUS_ACCEPTED) byEvent.set(r.usageId, (byEvent.get(r.usageId) ?? 0) + 1);
    expect(byEvent.size).toBe(6000);
    expect([...byEvent.values()].every((n) => n === 1)).toBe(true);
    expect(await storedCount(t)).toBe(6000);
  });
});
