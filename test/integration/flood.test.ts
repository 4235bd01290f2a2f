/**
 * Floods of HTTP/2 streams that never end, from clients without a token, and
 * the connection limits. The flood client is a separate process
 * (test/helpers/h2.ts), so this process's memory is the server's.
 *
 * Memory is what the process still holds after a forced full collection (JS
 * heap and buffers), compared with a generous bound: without the fix, 40
 * connections x 1000 refused streams stayed held (220 MB measured this way,
 * ~270 MB of RSS) and 10 x 50 health checks holding half-sent 500 KB messages
 * kept ~240 MB of RSS; with it, under 1 MB is left.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as http2 from 'node:http2';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import * as grpc from '@grpc/grpc-js';
import { service as healthServiceDefinition } from 'grpc-health-check';
import { call, startTestApp, type TestApp } from '../helpers/harness';
import { startFlood, type Flood } from '../helpers/h2';

const MiB = 1024 * 1024;

// A full garbage collection on demand (jest runs node without --expose-gc), so that what is measured is the memory
// the server still holds, not garbage the collector has not got round to on a busy machine.
v8.setFlagsFromString('--expose-gc');
const collectGarbage = vm.runInNewContext('gc') as () => void;

/** Bytes held by this process after a full collection: the JS heap and the buffers outside it. */
function retained(): number {
  collectGarbage();
  collectGarbage();
  const { heapUsed, external } = process.memoryUsage();
  return heapUsed + external;
}
const TOKEN = randomBytes(32).toString('hex');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-flood-'));
const tokensFile = path.join(tmp, 'tokens.json');
fs.writeFileSync(tokensFile, JSON.stringify([{ name: 'checkout', token: TOKEN, role: 'service' }]), { mode: 0o600 });
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

type ServingStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';
interface HealthClient extends grpc.Client {
  check(
    request: { service: string },
    metadata: grpc.Metadata,
    options: Partial<grpc.CallOptions>,
    callback: (err: grpc.ServiceError | null, response: { status: ServingStatus }) => void,
  ): grpc.ClientUnaryCall;
}
const HealthClient = grpc.makeGenericClientConstructor(
  healthServiceDefinition as unknown as grpc.ServiceDefinition,
  'grpc.health.v1.Health',
) as unknown as new (address: string, creds: grpc.ChannelCredentials, options?: grpc.ClientOptions) => HealthClient;

/** A health check on a connection of its own (so no flooded connection is reused). */
async function checkHealth(address: string, deadlineMs = 10_000): Promise<ServingStatus> {
  const health = new HealthClient(address, grpc.credentials.createInsecure(), { 'grpc.use_local_subchannel_pool': 1 });
  try {
    return await new Promise<ServingStatus>((resolve, reject) =>
      health.check({ service: '' }, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (err, res) =>
        err ? reject(err) : resolve(res.status),
      ),
    );
  } finally {
    health.close();
  }
}

const GRPC_OK = String(grpc.status.OK);
const UNAUTHENTICATED = String(grpc.status.UNAUTHENTICATED);
const RESOURCE_EXHAUSTED = String(grpc.status.RESOURCE_EXHAUSTED);

describe('a flood of streams from clients without a token', () => {
  let t: TestApp;
  let flood: Flood | undefined;

  beforeAll(async () => {
    t = await startTestApp({ AUTH_TOKENS_FILE: tokensFile }, { scheduler: false }, { token: TOKEN });
  });

  afterEach(async () => {
    await flood?.stop();
    flood = undefined;
  });

  afterAll(async () => {
    await t?.stop();
  });

  it('resets every refused stream at once: 40 connections x 1000 streams that never end cost bounded memory, and token and health calls still answer', async () => {
    const opts = { address: t.address, path: '/billing.v1.UserService/GetUser' };
    // Warm-up, so that what is measured is growth, not first-use allocations.
    flood = startFlood({ ...opts, connections: 2, streamsPerConnection: 1000 });
    await flood.settled;
    await flood.stop();

    const before = retained();
    flood = startFlood({ ...opts, connections: 40, streamsPerConnection: 1000 });
    const result = await flood.settled;
    const growth = retained() - before;

    // Every stream was refused (UNAUTHENTICATED) and then reset by the server with NO_ERROR, although the
    // client never ended one.
    expect({ opened: result.opened, statuses: result.statuses, closed: result.closed, rstCodes: result.rstCodes }).toEqual({
      opened: 40_000,
      statuses: { [UNAUTHENTICATED]: 40_000 },
      closed: 40_000,
      rstCodes: { [http2.constants.NGHTTP2_NO_ERROR]: 40_000 },
    });
    // Keeping the streams held 220 MB; released, they are garbage.
    expect(growth).toBeLessThan(40 * MiB);

    // While the flood client still holds all its connections: a token call and a health check answer.
    const started = Date.now();
    const { user } = await call(t.users, 'createUser', { email: 'after-flood@example.com', name: 'After', requestId: '' });
    expect(user!.id).toBeGreaterThan(0n);
    expect(await checkHealth(t.address)).toBe('SERVING');
    expect(Date.now() - started).toBeLessThan(15_000); // generous: a shared 2-core machine
  });

  it('health and reflection (open to all): 10 connections x 50 health checks holding half-sent 500 KB messages are cut to 8 calls per connection with at most 16 KiB each', async () => {
    const before = retained();
    flood = startFlood({
      address: t.address,
      path: '/grpc.health.v1.Health/Check',
      connections: 10,
      streamsPerConnection: 50,
      partialMessageBytes: 500 * 1024,
    });
    const result = await flood.settled;
    const growth = retained() - before;

    // Per connection: 8 held (at most 8 open-service calls at once), 42 refused at once; and the 8 held ones are
    // refused too as soon as their message prefix declares more than 16 KiB.
    expect(result.opened).toBe(500);
    expect(result.statuses).toEqual({ [RESOURCE_EXHAUSTED]: 500 });
    expect(result.closed).toBe(500);
    expect(growth).toBeLessThan(40 * MiB); // holding them all: ~240 MB

    expect(await checkHealth(t.address)).toBe('SERVING');
    const { user } = await call(t.users, 'createUser', { email: 'after-health-flood@example.com', name: 'After', requestId: '' });
    expect(user!.id).toBeGreaterThan(0n);
  });

  it('holds at most 8 open-service calls per connection; more are RESOURCE_EXHAUSTED, other connections are not affected', async () => {
    flood = startFlood({ address: t.address, path: '/grpc.health.v1.Health/Watch', connections: 3, streamsPerConnection: 20 });
    const result = await flood.settled;
    // Watch with no request sent yet: 8 stay open per connection, 12 are refused and reset.
    expect(result.opened).toBe(60);
    expect(result.statuses).toEqual({ [RESOURCE_EXHAUSTED]: 36 });
    expect(result.closed).toBe(36);
    expect(await checkHealth(t.address)).toBe('SERVING');
  });
});

/** The promise's value, or -1 if it takes longer than `ms`. */
function within(promise: Promise<number>, ms: number): Promise<number> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<number>((resolve) => (timer = setTimeout(() => resolve(-1), ms)));
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

describe('connection limits', () => {
  let t: TestApp;

  afterEach(async () => {
    await t?.stop();
  });

  /** Opens a raw HTTP/2 connection; resolves true once the server's SETTINGS arrive, false if it is closed first. */
  function connects(address: string, sessions: http2.ClientHttp2Session[]): Promise<boolean> {
    return new Promise((resolve) => {
      const session = http2.connect(`http://${address}`);
      sessions.push(session);
      session.on('error', () => undefined);
      session.once('remoteSettings', () => resolve(true));
      session.once('close', () => resolve(false));
    });
  }

  it('MAX_CONNECTIONS: a connection beyond the limit is closed at once; the others keep working, and a freed slot is reused', async () => {
    t = await startTestApp({ MAX_CONNECTIONS: '4' }, { scheduler: false });
    const sessions: http2.ClientHttp2Session[] = [];
    try {
      // The harness's clients have not connected yet: 4 raw connections take every slot.
      const first = await Promise.all([1, 2, 3, 4].map(() => connects(t.address, sessions)));
      expect(first).toEqual([true, true, true, true]);
      expect(await connects(t.address, sessions)).toBe(false);

      // Once the server has seen one close, its slot takes a new connection.
      sessions[0].destroy();
      let reused = false;
      for (const started = Date.now(); !reused && Date.now() - started < 10_000; ) reused = await connects(t.address, sessions);
      expect(reused).toBe(true);

      // Everything raw closed: the gRPC client connects and calls (retried while the server is still counting).
      for (const s of sessions) s.destroy();
      let created: bigint | undefined;
      for (const started = Date.now(); created === undefined && Date.now() - started < 10_000; ) {
        try {
          created = (await call(t.users, 'createUser', { email: 'slot@example.com', name: 'Slot', requestId: 'slot' })).user!.id;
        } catch (err) {
          if ((err as grpc.ServiceError).code !== grpc.status.UNAVAILABLE) throw err;
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      }
      expect(created).toBeGreaterThan(0n);
    } finally {
      for (const s of sessions) s.destroy();
    }
  });

  it('MAX_CONNECTION_IDLE_MS: a connection that never sends the HTTP/2 preface, and one idle after a call, are closed', async () => {
    t = await startTestApp({ MAX_CONNECTION_IDLE_MS: '1000' }, { scheduler: false });
    const [host, port] = [t.address.split(':')[0], Number(t.address.split(':')[1])];
    const silent = net.connect(port, host);
    silent.resume(); // read (and drop) what the server sends, so its close is seen
    const silentClosed = new Promise<number>((resolve) => {
      const opened = Date.now();
      silent.on('error', () => undefined);
      silent.once('close', () => resolve(Date.now() - opened));
    });
    const sessions: http2.ClientHttp2Session[] = [];
    expect(await connects(t.address, sessions)).toBe(true);
    const idleClosed = new Promise<number>((resolve) => {
      const opened = Date.now();
      sessions[0].once('goaway', () => resolve(Date.now() - opened));
    });
    try {
      // Closed after about a second; generous bounds either way.
      const [silentMs, idleMs] = await Promise.all([within(silentClosed, 20_000), within(idleClosed, 20_000)]);
      expect(silentMs).toBeGreaterThanOrEqual(900);
      expect(silentMs).toBeLessThan(15_000);
      expect(idleMs).toBeGreaterThanOrEqual(900);
      expect(idleMs).toBeLessThan(15_000);
    } finally {
      silent.destroy();
      for (const s of sessions) s.destroy();
    }
  });
});
