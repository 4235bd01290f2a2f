import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as http2 from 'node:http2';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import { MAX_PAGE_SIZE } from '../../src/shared/paging';
import * as userPb from '../../generated/billing/v1/user_service';
import { call, startTestApp, type TestApp } from '../helpers/harness';

const MiB = 1024 * 1024;
const CREATE_USER = userPb.UserServiceService.createUser.path;

/**
 * A CreateUserRequest padded to `size` bytes with an unknown field (number
 * 1000), which the server's decoder skips: below the limit it is a valid
 * request that creates the user, so only the size can stop it.
 */
function paddedCreateUser(email: string, size: number): Buffer {
  const request = Buffer.from(userPb.CreateUserRequest.encode({ email, name: 'Padded', requestId: '' }).finish());
  const overhead = request.length + 2 + 4; // the padding's tag (2 bytes) and length (up to 4)
  const padding = new BinaryWriter().tag(1000, WireType.LengthDelimited).bytes(new Uint8Array(size - overhead)).finish();
  return Buffer.concat([request, padding]);
}

/** Sends raw request bytes to CreateUser; resolves with the status code. */
function sendRaw(client: grpc.Client, bytes: Buffer): Promise<grpc.status> {
  return new Promise((resolve) => {
    client.makeUnaryRequest(
      CREATE_USER,
      (b: Buffer) => b,
      (b: Buffer) => b,
      bytes,
      new grpc.Metadata(),
      { deadline: Date.now() + 20_000 },
      (err) => resolve(err ? err.code : grpc.status.OK),
    );
  });
}

async function emails(t: TestApp): Promise<Set<string>> {
  const rows = await t.app.db.fork().execute<{ email: string }[]>('select email from users');
  return new Set(rows.map((r) => r.email));
}

/** The flood client: sends the file's bytes to CreateUser n times, 10 at a time, and prints {code: count}. */
const FLOOD_SCRIPT = `
const grpc = require(process.argv[1]);
const [address, file, n] = process.argv.slice(2);
const body = require('node:fs').readFileSync(file);
const client = new grpc.Client(address, grpc.credentials.createInsecure());
const codes = {};
const one = () => new Promise((resolve) => client.makeUnaryRequest(
  '${CREATE_USER}', (b) => b, (b) => b, body, new grpc.Metadata(), { deadline: Date.now() + 30000 },
  (err) => { const code = err ? err.code : 0; codes[code] = (codes[code] || 0) + 1; resolve(); }));
(async () => {
  for (let i = 0; i < Number(n); i += 10) await Promise.all(Array.from({ length: Math.min(10, Number(n) - i) }, one));
  client.close();
  process.stdout.write(JSON.stringify(codes));
})();
`;

/** Floods CreateUser from a child process with the request in `file`; resolves with the status codes seen. */
function flood(address: string, file: string, n: number): Promise<Record<string, number>> {
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['-e', FLOOD_SCRIPT, require.resolve('@grpc/grpc-js'), address, file, String(n)],
      { timeout: 60_000 },
      (err, stdout) => (err ? reject(err) : resolve(JSON.parse(stdout) as Record<string, number>)),
    );
  });
}

/** Runs `fn` over 0..n-1, `width` at a time. */
async function inWaves(n: number, width: number, fn: (i: number) => Promise<unknown>): Promise<void> {
  for (let start = 0; start < n; start += width) {
    await Promise.all(Array.from({ length: Math.min(width, n - start) }, (_, k) => fn(start + k)));
  }
}

describe('default limits', () => {
  let t: TestApp;
  let raw: grpc.Client;

  beforeAll(async () => {
    t = await startTestApp();
    raw = new grpc.Client(t.address, grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    raw?.close();
    await t?.stop();
  });

  it('accepts a request just under 1 MiB (the padding itself is harmless)', async () => {
    expect(await sendRaw(raw, paddedCreateUser('under@example.com', MiB - 1024))).toBe(grpc.status.OK);
    expect((await emails(t)).has('under@example.com')).toBe(true);
  });

  it('refuses a request over 1 MiB with RESOURCE_EXHAUSTED, and nothing is written', async () => {
    expect(await sendRaw(raw, paddedCreateUser('over@example.com', MiB + 1024))).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect((await emails(t)).has('over@example.com')).toBe(false);
  });

  it('keeps memory flat through 200 oversized (4 MiB) requests and serves normally after them', async () => {
    // The requests come from a child process, so this process's memory is the server's alone.
    const file = path.join(t.dir, 'oversized.bin');
    fs.writeFileSync(file, paddedCreateUser('flood@example.com', 4 * MiB));
    expect(await flood(t.address, file, 20)).toEqual({ [grpc.status.RESOURCE_EXHAUSTED]: 20 }); // warm-up
    const before = process.memoryUsage().rss;
    expect(await flood(t.address, file, 200)).toEqual({ [grpc.status.RESOURCE_EXHAUSTED]: 200 });
    const growth = process.memoryUsage().rss - before;

    // 200 x 4 MiB is 800 MiB: buffering the requests, let alone keeping them, would go far past this.
    expect(growth).toBeLessThan(100 * MiB);
    expect((await emails(t)).has('flood@example.com')).toBe(false);
    const res = await call(t.users, 'createUser', { email: 'after-flood@example.com', name: 'After', requestId: '' });
    expect(res.user!.id).toBeGreaterThan(0n);
  });

  it(`caps page_size at ${MAX_PAGE_SIZE}: page_size 100000 returns 500 users and a token for the rest`, async () => {
    const existing = (await emails(t)).size;
    await inWaves(MAX_PAGE_SIZE + 1 - existing + 5, 25, (i) =>
      call(t.users, 'createUser', { email: `page${i}@example.com`, name: 'P', requestId: '' }),
    );
    const total = (await emails(t)).size;
    expect(total).toBeGreaterThan(MAX_PAGE_SIZE);

    const first = await call(t.users, 'listUsers', { pageSize: 100_000, pageToken: '', status: 0 });
    expect(first.users).toHaveLength(MAX_PAGE_SIZE);
    expect(first.nextPageToken).not.toBe('');
    const rest = await call(t.users, 'listUsers', { pageSize: 100_000, pageToken: first.nextPageToken, status: 0 });
    expect(rest.users).toHaveLength(total - MAX_PAGE_SIZE);
    expect(rest.nextPageToken).toBe('');
  });
});

describe('configured limits', () => {
  let t: TestApp;
  let raw: grpc.Client;

  beforeAll(async () => {
    t = await startTestApp({
      MAX_RECEIVE_MESSAGE_BYTES: '4096',
      MAX_SEND_MESSAGE_BYTES: '65536',
      MAX_CONCURRENT_STREAMS: '7',
      MAX_CONNECTION_AGE_MS: '1000',
      MAX_CONNECTION_AGE_GRACE_MS: '5000',
    });
    raw = new grpc.Client(t.address, grpc.credentials.createInsecure());
  });

  afterAll(async () => {
    raw?.close();
    await t?.stop();
  });

  it('applies MAX_RECEIVE_MESSAGE_BYTES: 3000 bytes pass, 5000 are RESOURCE_EXHAUSTED', async () => {
    expect(await sendRaw(raw, paddedCreateUser('small@example.com', 3000))).toBe(grpc.status.OK);
    expect(await sendRaw(raw, paddedCreateUser('big@example.com', 5000))).toBe(grpc.status.RESOURCE_EXHAUSTED);
    const known = await emails(t);
    expect([known.has('small@example.com'), known.has('big@example.com')]).toEqual([true, false]);
  });

  it('applies MAX_SEND_MESSAGE_BYTES: a response over 64 KiB is RESOURCE_EXHAUSTED, a smaller page is fine', async () => {
    // 300 users with 200-character names: about 80 KiB in one page of 500, about 27 KiB in a page of 100.
    await inWaves(300, 25, (i) =>
      call(t.users, 'createUser', { email: `wide${i}@example.com`, name: 'N'.repeat(200), requestId: '' }),
    );
    await expect(call(t.users, 'listUsers', { pageSize: 500, pageToken: '', status: 0 })).rejects.toMatchObject({
      code: grpc.status.RESOURCE_EXHAUSTED,
    });
    expect((await call(t.users, 'listUsers', { pageSize: 100, pageToken: '', status: 0 })).users).toHaveLength(100);
  });

  it('announces MAX_CONCURRENT_STREAMS in its HTTP/2 settings, and closes a connection after MAX_CONNECTION_AGE_MS', async () => {
    const session = http2.connect(`http://${t.address}`);
    try {
      const opened = Date.now();
      const settings = await new Promise<http2.Settings>((resolve, reject) => {
        session.once('remoteSettings', resolve);
        session.once('error', reject);
      });
      expect(settings.maxConcurrentStreams).toBe(7);
      // 1000 ms with up to 10% jitter either way.
      await new Promise<void>((resolve) => session.once('goaway', () => resolve()));
      const age = Date.now() - opened;
      expect(age).toBeGreaterThanOrEqual(850);
      expect(age).toBeLessThan(5000);
    } finally {
      session.destroy();
    }
  });
});
