/**
 * EventService over gRPC: ListEvents pages and filters, WatchEvents history
 * then live, resuming after a disconnect and after a restart with no gap and
 * no duplicate, OUT_OF_RANGE after pruning, a consumer that does not read
 * ended with RESOURCE_EXHAUSTED, bad requests, shutdown ending watchers at
 * once, and on PostgreSQL two replicas on one database (an event committed
 * through either reaches watchers on both, in cursor order, each once); the
 * built service with 20 watchers, ended at SIGTERM without a listener-leak
 * warning.
 *
 * Events are appended through their door (the events repository, in a
 * transaction of the app's database): these tests are about delivery, not
 * about which change writes which event.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as eventPb from '../../generated/billing/v1/event_service';
import { createTestDatabase, onPostgres, type TestDatabase } from '../helpers/database';
import { append, eventually, expectIncreasing, listAll, userCreated, Watch } from '../helpers/events';
import { call, expectGrpcError, startTestApp, type TestApp } from '../helpers/harness';
import { startServiceProcess, useProcessWorkspace } from '../helpers/service-process';
import type { NewEvent } from '../../src/events/events.types';

jest.setTimeout(120_000);

const clientOf = (t: TestApp) => new eventPb.EventServiceClient(t.address, t.credentials, t.clientOptions);
const range = (n: number, from = 0) => Array.from({ length: n }, (_, i) => from + i);
const DAY = 86_400_000;

describe('EventService on one replica', () => {
  let t: TestApp;
  let events: eventPb.EventServiceClient;
  const watches: Watch[] = [];
  const watch = (request: Partial<eventPb.WatchEventsRequest> = {}, opts: { paused?: boolean } = {}) => {
    const w = new Watch(events, request, opts);
    watches.push(w);
    return w;
  };

  beforeEach(async () => {
    t = await startTestApp({ EVENT_POLL_MS: '10' }, { scheduler: false });
    events = clientOf(t);
  });
  afterEach(async () => {
    for (const w of watches.splice(0)) w.cancel();
    events.close();
    await t.stop();
  });

  it('ListEvents pages oldest first (default 100, at most 500) and filters by type and user', async () => {
    const mixed: NewEvent[] = range(620).map((i) =>
      i % 3 === 0
        ? { type: 'user.suspended', userId: 1 + (i % 4), refId: null, payload: { reason: 'r', billingRecordId: i } }
        : userCreated(1 + (i % 4), i),
    );
    await append(t.app, mixed);
    const first = await call(events, 'listEvents', { afterCursor: '', types: [], userId: 0n, pageSize: 0 });
    expect(first.events).toHaveLength(100);
    expectIncreasing(first.events.map((e) => e.cursor));
    expect(first.nextCursor).toBe(first.events[99].cursor);
    expect(first.events[0]).toMatchObject({ type: 'user.suspended', userId: 1n, payload: { $case: 'userSuspended', value: { reason: 'r', billingRecordId: 0n } } });
    expect(first.events[1]).toMatchObject({ type: 'user.created', userId: 2n, payload: { $case: 'userCreated', value: { name: 'u1', email: 'u1@example.com' } } });
    expect(first.events[0].cursor).toMatch(/^\d{16}$/);
    expect(first.events[0].time).toBeInstanceOf(Date);

    const big = await call(events, 'listEvents', { afterCursor: first.nextCursor, types: [], userId: 0n, pageSize: 10_000 });
    expect(big.events).toHaveLength(500);
    expect(BigInt(big.events[0].cursor)).toBeGreaterThan(BigInt(first.nextCursor));
    const rest = await call(events, 'listEvents', { afterCursor: big.nextCursor, types: [], userId: 0n, pageSize: 500 });
    expect(rest.events).toHaveLength(20);
    // At the end: no events, and the cursor to poll with again is the one given.
    const none = await call(events, 'listEvents', { afterCursor: rest.nextCursor, types: [], userId: 0n, pageSize: 10 });
    expect(none).toEqual({ events: [], nextCursor: rest.nextCursor });

    const all = await listAll(events);
    expect(all).toHaveLength(620);
    const suspendedOfUser2 = await listAll(events, { types: ['user.suspended'], userId: 2n });
    const expected = mixed.filter((e) => e.type === 'user.suspended' && e.userId === 2).length;
    expect(expected).toBeGreaterThan(0);
    expect(suspendedOfUser2).toHaveLength(expected);
    expect(suspendedOfUser2.every((e) => e.type === 'user.suspended' && e.userId === 2n)).toBe(true);
    expect(await listAll(events, { types: ['user.suspended', 'user.created'] })).toHaveLength(620);
  });

  it('refuses a bad cursor, an unknown type, a negative user id and a negative page size', async () => {
    const base = { afterCursor: '', types: [] as string[], userId: 0n, pageSize: 0 };
    for (const afterCursor of ['abc', '-1', '1.5', ' 1', '12345678901234567', '99999999999999999999']) {
      const err = await expectGrpcError(call(events, 'listEvents', { ...base, afterCursor }), grpc.status.INVALID_ARGUMENT, 'INVALID_CURSOR');
      expect(err.metadata.get('billing-error-field')).toEqual(['after_cursor']);
    }
    await expectGrpcError(call(events, 'listEvents', { ...base, types: ['user.created', 'user.exploded'] }), grpc.status.INVALID_ARGUMENT, 'UNKNOWN_EVENT_TYPE');
    await expectGrpcError(call(events, 'listEvents', { ...base, userId: -1n }), grpc.status.INVALID_ARGUMENT, 'INVALID_ID');
    await expectGrpcError(call(events, 'listEvents', { ...base, pageSize: -1 }), grpc.status.INVALID_ARGUMENT, 'INVALID_PAGE_SIZE');

    expect(await watch({ afterCursor: 'x1' }).ended).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, reason: 'INVALID_CURSOR' });
    expect(await watch({ types: ['wallet.robbed'] }).ended).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, reason: 'UNKNOWN_EVENT_TYPE' });
    expect(await watch({ userId: -5n }).ended).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, reason: 'INVALID_ID' });
    expect(t.app.services.events.watchers).toBe(0);
  });

  it('WatchEvents sends the history (more than one page) and then live events, each once, in cursor order', async () => {
    await append(t.app, range(1200).map((i) => userCreated(1 + (i % 3), i)));
    const all = watch();
    const user2 = watch({ userId: 2n, types: ['user.created'] });
    await all.until(1200);
    for (const b of range(30)) await append(t.app, range(10).map((i) => userCreated(1 + (i % 3), 1200 + b * 10 + i)));
    await all.until(1500);
    const listed = await listAll(events);
    const ofUser2 = listed.filter((e) => e.userId === 2n);
    expect(ofUser2).toHaveLength(400 + 30 * 3);
    await user2.until(ofUser2.length);
    expect(all.cursors).toEqual(listed.map((e) => e.cursor));
    expect(user2.cursors).toEqual(ofUser2.map((e) => e.cursor));
    // Nothing more arrives (no duplicate of what was sent live).
    await new Promise((r) => setTimeout(r, 200));
    expect(all.events).toHaveLength(1500);
    expect(t.app.services.events.watchers).toBe(2);
  });

  it('events committed while the history is read arrive once, with no gap', async () => {
    await append(t.app, range(3000).map((i) => userCreated(1, i)));
    const w = watch();
    // Commits while the watcher reads its history pages.
    for (const b of range(40)) await append(t.app, range(25).map((i) => userCreated(1, 3000 + b * 25 + i)));
    await w.until(4000);
    await new Promise((r) => setTimeout(r, 100));
    expect(w.cursors).toEqual((await listAll(events)).map((e) => e.cursor));
  });

  it('resumes after a disconnect from the last cursor seen: no gap, no duplicate', async () => {
    await append(t.app, range(50).map((i) => userCreated(1, i)));
    const first = watch();
    await first.until(50);
    first.cancel();
    expect(await first.ended).toMatchObject({ code: grpc.status.CANCELLED });
    await eventually('the watcher is released', () => t.app.services.events.watchers === 0);
    // Committed while nobody watched.
    await append(t.app, range(30).map((i) => userCreated(1, 50 + i)));
    const second = watch({ afterCursor: first.lastCursor });
    await second.until(30);
    await append(t.app, range(20).map((i) => userCreated(1, 80 + i)));
    await second.until(50);
    expect([...first.cursors, ...second.cursors]).toEqual((await listAll(events)).map((e) => e.cursor));
  });

  it('a cursor older than the retention is OUT_OF_RANGE [CURSOR_EXPIRED]; an empty cursor starts at the oldest event kept', async () => {
    // The prune the service starts at start-up, in the background, first: prune() joins a prune in flight, and
    // one that read the table before the old events below were written deletes none of them (CI on PostgreSQL saw 0).
    await t.app.services.events.prune();
    const old = new Date(Date.now() - 31 * DAY);
    await append(t.app, range(10).map((i) => userCreated(1, i)), old);
    const before = await listAll(events);
    await append(t.app, range(5).map((i) => userCreated(1, 10 + i)));
    expect(await t.app.services.events.prune()).toBe(10);

    const err = await expectGrpcError(
      call(events, 'listEvents', { afterCursor: before[3].cursor, types: [], userId: 0n, pageSize: 10 }),
      grpc.status.OUT_OF_RANGE,
      'CURSOR_EXPIRED',
    );
    expect(err.details).toMatch(/empty after_cursor/);
    expect(await watch({ afterCursor: before[3].cursor }).ended).toMatchObject({ code: grpc.status.OUT_OF_RANGE, reason: 'CURSOR_EXPIRED' });
    // The last pruned cursor is still good: nothing after it was deleted.
    const kept = await call(events, 'listEvents', { afterCursor: before[9].cursor, types: [], userId: 0n, pageSize: 10 });
    expect(kept.events).toHaveLength(5);
    const fromStart = watch();
    await fromStart.until(5);
    expect(fromStart.cursors).toEqual(kept.events.map((e) => e.cursor));
  });

  it('ends a consumer that does not read with RESOURCE_EXHAUSTED [CONSUMER_TOO_SLOW]; it resumes from its last cursor', async () => {
    await t.stop();
    t = await startTestApp({ EVENT_POLL_MS: '10', EVENT_WATCH_BUFFER: '50' }, { scheduler: false });
    events.close();
    events = clientOf(t);
    const slow = watch({}, { paused: true });
    await eventually('the watcher is open', () => t.app.services.events.watchers === 1);
    // Far more than HTTP/2 flow control and grpc-js buffer, and the watcher's 50, can hold.
    let n = 0;
    while (t.app.services.events.watchers > 0) {
      if (n >= 100_000) throw new Error('the consumer that does not read was never ended');
      await append(t.app, range(1000).map((i) => userCreated(1, n + i)));
      n += 1000;
      await new Promise((r) => setTimeout(r, 20));
    }
    // What was sent before the end is still delivered, then the status.
    slow.call.resume();
    expect(await slow.ended).toMatchObject({ code: grpc.status.RESOURCE_EXHAUSTED, reason: 'CONSUMER_TOO_SLOW' });
    expect(slow.events.length).toBeLessThan(n);
    const resumed = watch({ afterCursor: slow.lastCursor });
    await resumed.until(n - slow.events.length);
    expect([...slow.cursors, ...resumed.cursors]).toEqual((await listAll(events)).map((e) => e.cursor));
  });

  it('shutdown ends watchers at once with UNAVAILABLE [SHUTTING_DOWN], not after the grace period', async () => {
    await t.stop();
    t = await startTestApp({ EVENT_POLL_MS: '10', SHUTDOWN_GRACE_MS: '20000' }, { scheduler: false });
    events.close();
    events = clientOf(t);
    const w = [watch(), ...range(14).map(() => watch({ types: ['user.deleted'] }))];
    await append(t.app, [userCreated(1, 1)]);
    await w[0].until(1);
    await eventually('every watcher is open', () => t.app.services.events.watchers === 15);
    const started = Date.now();
    await t.stop();
    expect(Date.now() - started).toBeLessThan(5000);
    for (const x of w) expect(await x.ended).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: 'SHUTTING_DOWN' });
  });
});

describe('EventService across a restart', () => {
  let dir: string;
  let db: TestDatabase;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-events-restart-'));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a watcher resumes from its last cursor on the restarted service: no gap, no duplicate', async () => {
    const env = { ...db.env, EVENT_POLL_MS: '10', LOG_FILE_PATH: path.join(dir, 'usage.ndjson') };
    let t = await startTestApp(env, { scheduler: false });
    let client = clientOf(t);
    await append(t.app, range(40).map((i) => userCreated(1, i)));
    const before = new Watch(client);
    await before.until(40);
    await append(t.app, range(10).map((i) => userCreated(1, 40 + i)));
    await before.until(50);
    await t.app.stop();
    expect((await before.ended).code).toBe(grpc.status.UNAVAILABLE);
    client.close();

    t = await startTestApp(env, { scheduler: false });
    client = clientOf(t);
    try {
      await append(t.app, range(25).map((i) => userCreated(1, 50 + i)));
      const after = new Watch(client, { afterCursor: before.lastCursor });
      await after.until(25);
      await append(t.app, range(5).map((i) => userCreated(1, 75 + i)));
      await after.until(30);
      expect([...before.cursors, ...after.cursors]).toEqual((await listAll(client)).map((e) => e.cursor));
      expect(new Set([...before.cursors, ...after.cursors]).size).toBe(80);
      after.cancel();
    } finally {
      client.close();
      await t.app.stop();
    }
  });
});

(onPostgres ? describe : describe.skip)('EventService on two replicas (PostgreSQL)', () => {
  let dir: string;
  let db: TestDatabase;
  let apps: TestApp[] = [];
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-events-replicas-'));
    db = await createTestDatabase(dir);
    const env = { ...db.env, EVENT_POLL_MS: '10', LOG_FILE_PATH: path.join(dir, 'usage.ndjson') };
    apps = [await startTestApp(env, { scheduler: false })];
    apps.push(await startTestApp(env, { scheduler: false }));
  });
  afterEach(async () => {
    for (const a of apps) await a.app.stop();
    apps = [];
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('an event committed through one replica reaches a watcher on the other', async () => {
    const [a, b] = apps.map(clientOf);
    const onB = new Watch(b);
    await eventually('the watcher on B is open', () => apps[1].app.services.events.watchers === 1);
    await append(apps[0].app, [userCreated(7, 1)]);
    await onB.until(1, 5000);
    expect(onB.events[0]).toMatchObject({ type: 'user.created', userId: 7n });
    const onA = new Watch(a);
    await append(apps[1].app, [userCreated(8, 2)]);
    await onA.until(2, 5000);
    await onB.until(2, 5000);
    expect(onA.cursors).toEqual(onB.cursors);
    onA.cancel();
    onB.cancel();
    a.close();
    b.close();
  });

  it('many concurrent transactions on both replicas: watchers on each see every event once, in strictly increasing order', async () => {
    const clients = apps.map(clientOf);
    const watchers = clients.map((c) => new Watch(c));
    await eventually('both watchers are open', () => apps.every((x) => x.app.services.events.watchers === 1));
    const ROUNDS = 10;
    const PER_ROUND = 16; // transactions at once on each replica
    let n = 0;
    for (let r = 0; r < ROUNDS; r++) {
      await Promise.all(
        apps.flatMap((x) =>
          range(PER_ROUND).map(() => {
            const size = 1 + (n % 5);
            const batch = range(size).map((i) => userCreated(1 + (n % 9), n * 10 + i));
            n++;
            return append(x.app, batch);
          }),
        ),
      );
    }
    const listed = (await listAll(clients[0])).map((e) => e.cursor);
    for (const w of watchers) {
      await w.until(listed.length);
      await new Promise((r) => setTimeout(r, 100));
      expectIncreasing(w.cursors);
      expect(w.cursors).toEqual(listed);
      w.cancel();
    }
    for (const c of clients) c.close();
  });
});

describe('EventService in a service process', () => {
  const ws = useProcessWorkspace('billing-events-process-');

  it('holds 20 watchers without a listener-leak warning and ends them all at SIGTERM, exit 0', async () => {
    const { dir, db } = ws;
    const svc = await startServiceProcess({ GRPC_PORT: '0', ...db.env, INGEST_CRON: 'off', SHUTDOWN_GRACE_MS: '20000' });
    const client = new eventPb.EventServiceClient(`127.0.0.1:${svc.port}`, grpc.credentials.createInsecure());
    try {
      const w = range(20).map(() => new Watch(client));
      await call(svc.users, 'createUser', { email: 'p@example.com', name: 'P', requestId: '' });
      // Whether or not user.created is written yet (another change adds the emitters), the streams are open:
      await new Promise((r) => setTimeout(r, 500));
      const started = Date.now();
      svc.child.kill('SIGTERM');
      for (const x of w) expect(await x.ended).toMatchObject({ code: grpc.status.UNAVAILABLE, reason: 'SHUTTING_DOWN' });
      expect((await svc.exit).code).toBe(0);
      expect(Date.now() - started).toBeLessThan(10_000);
      expect(svc.output()).not.toMatch(/MaxListenersExceededWarning/);
    } finally {
      client.close();
      svc.close();
    }
  });
});
