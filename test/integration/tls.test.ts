import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { ConfigError } from '../../src/config';
import * as userPb from '../../generated/billing/v1/user_service';
import { bufCurl, call, clientConnection, expectGrpcError, startTestApp, type ClientSetup, type TestApp } from '../helpers/harness';

const FIXTURES = path.resolve(__dirname, '..', 'fixtures', 'tls');
const fixture = (name: string) => path.join(FIXTURES, name);
const pem = (name: string) => fs.readFileSync(fixture(name));

const CA = pem('ca.pem');
const CLIENT = { cert: pem('client.pem'), key: pem('client.key') };
const UNTRUSTED = { cert: pem('untrusted-client.pem'), key: pem('untrusted-client.key') };

const TLS_ENV = { TLS_CERT_FILE: fixture('server.pem'), TLS_KEY_FILE: fixture('server.key') };
const MTLS_ENV = { ...TLS_ENV, TLS_CLIENT_CA_FILE: fixture('ca.pem') };

let seq = 0;
const email = () => `tls${++seq}@example.com`;

/** CreateUser through a fresh UserService client with this setup; the client is closed afterwards. */
async function createUserWith(t: TestApp, setup: ClientSetup): Promise<userPb.CreateUserResponse> {
  const { credentials, clientOptions } = clientConnection(setup);
  const client = new userPb.UserServiceClient(t.address, credentials, clientOptions);
  try {
    return await call(client, 'createUser', { email: email(), name: 'T', requestId: '' }, { deadlineMs: 5000 });
  } finally {
    client.close();
  }
}

/** The call fails at the transport: the handshake (or plaintext HTTP/2 on a TLS port) never yields a call. */
async function expectUnavailable(promise: Promise<unknown>): Promise<void> {
  await expect(promise).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
}

async function countUsers(t: TestApp): Promise<number> {
  const rows = await t.app.db.fork().execute<{ n: number }[]>('select count(*) as n from users');
  return Number(rows[0].n);
}

describe('TLS', () => {
  let t: TestApp;

  beforeAll(async () => {
    t = await startTestApp(TLS_ENV, {}, { tls: { ca: CA } });
  });

  afterAll(async () => {
    await t?.stop();
  });

  it('serves a client that trusts the CA', async () => {
    const res = await call(t.users, 'createUser', { email: email(), name: 'TLS', requestId: '' });
    expect(res.user!.id).toBeGreaterThan(0n);
  });

  it('refuses a plaintext client', async () => {
    const before = await countUsers(t);
    await expectUnavailable(createUserWith(t, {}));
    expect(await countUsers(t)).toBe(before);
  });

  it('refuses a TLS client that does not trust the CA', async () => {
    await expectUnavailable(createUserWith(t, { tls: { ca: UNTRUSTED.cert } }));
  });

  it('does not ask for a client certificate (a client that sends one still works)', async () => {
    expect((await createUserWith(t, { tls: { ca: CA, ...UNTRUSTED } })).user!.id).toBeGreaterThan(0n);
  });
});

describe('mutual TLS', () => {
  let t: TestApp;

  beforeAll(async () => {
    t = await startTestApp(MTLS_ENV, {}, { tls: { ca: CA, ...CLIENT } });
  });

  afterAll(async () => {
    await t?.stop();
  });

  it('serves a client with a certificate the CA issued', async () => {
    expect((await createUserWith(t, { tls: { ca: CA, ...CLIENT } })).user!.id).toBeGreaterThan(0n);
    expect((await call(t.users, 'listUsers', { pageSize: 10, pageToken: '', status: 0 })).users.length).toBeGreaterThan(0);
  });

  it('refuses a client without a certificate, and nothing is written', async () => {
    const before = await countUsers(t);
    await expectUnavailable(createUserWith(t, { tls: { ca: CA } }));
    expect(await countUsers(t)).toBe(before);
  });

  it('refuses a client with a certificate the CA did not issue, and nothing is written', async () => {
    const before = await countUsers(t);
    await expectUnavailable(createUserWith(t, { tls: { ca: CA, ...UNTRUSTED } }));
    expect(await countUsers(t)).toBe(before);
  });

  it('refuses a plaintext client', async () => {
    await expectUnavailable(createUserWith(t, {}));
  });

  it('lets buf curl in with --cert/--key and keeps it out without them', async () => {
    const url = `https://127.0.0.1:${t.port}/billing.v1.UserService/CreateUser`;
    const data = JSON.stringify({ email: email(), name: 'Curl mTLS' });
    const ok = await bufCurl(['--protocol', 'grpc', '--cacert', fixture('ca.pem'), '--cert', fixture('client.pem'), '--key', fixture('client.key'), '-d', data, url]);
    expect(ok).toMatchObject({ exitCode: 0, stderr: '' });
    const refused = await bufCurl(['--protocol', 'grpc', '--cacert', fixture('ca.pem'), '-d', data, url]);
    expect(refused.exitCode).not.toBe(0);
  });
});

describe('TLS with bearer tokens (the README setup)', () => {
  const token = randomBytes(32).toString('hex');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-tls-'));
  const tokensFile = path.join(dir, 'tokens.json');
  fs.writeFileSync(tokensFile, JSON.stringify([{ name: 'checkout', token, role: 'service' }]), { mode: 0o600 });
  let t: TestApp;

  beforeAll(async () => {
    t = await startTestApp({ ...TLS_ENV, AUTH_TOKENS_FILE: tokensFile }, {}, { tls: { ca: CA }, token });
  });

  afterAll(async () => {
    await t?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('serves the harness clients (TLS + token)', async () => {
    expect((await call(t.users, 'createUser', { email: email(), name: 'Both', requestId: '' })).user!.id).toBeGreaterThan(0n);
  });

  it('refuses a TLS client without the token', async () => {
    const { credentials, clientOptions } = clientConnection({ tls: { ca: CA } });
    const client = new userPb.UserServiceClient(t.address, credentials, clientOptions);
    try {
      await expectGrpcError(call(client, 'getUser', { id: 1n }), grpc.status.UNAUTHENTICATED, 'MISSING_TOKEN');
    } finally {
      client.close();
    }
  });

  it('works end to end with buf curl --cacert and an Authorization header', async () => {
    const url = `https://127.0.0.1:${t.port}/billing.v1.UserService/CreateUser`;
    const address = email();
    const res = await bufCurl([
      '--protocol',
      'grpc',
      '--cacert',
      fixture('ca.pem'),
      '--header',
      `Authorization: Bearer ${token}`,
      '-d',
      JSON.stringify({ email: address, name: 'Curl TLS' }),
      url,
    ]);
    expect(res).toMatchObject({ exitCode: 0, stderr: '' });
    expect((JSON.parse(res.stdout) as { user: { email: string; status: string } }).user).toMatchObject({
      email: address,
      status: 'USER_STATUS_ACTIVE',
    });

    const noToken = await bufCurl(['--protocol', 'grpc', '--cacert', fixture('ca.pem'), '-d', '{"id":1}', `https://127.0.0.1:${t.port}/billing.v1.UserService/GetUser`]);
    expect(noToken.exitCode).toBe(grpc.status.UNAUTHENTICATED << 3);

    const list = await bufCurl(['--protocol', 'grpc', '--cacert', fixture('ca.pem'), '--list-services', `https://127.0.0.1:${t.port}`]);
    expect(list.exitCode).toBe(0);
    expect(list.stdout).toContain('billing.v1.UserService');
  });

  it('works with buf curl reading the header from a file (-H @file), as the README suggests', async () => {
    const headers = path.join(dir, 'headers');
    fs.writeFileSync(headers, `Authorization: Bearer ${token}\n`, { mode: 0o600 });
    const res = await bufCurl([
      '--protocol',
      'grpc',
      '--cacert',
      fixture('ca.pem'),
      '-H',
      `@${headers}`,
      '-d',
      '{"page_size":1}',
      `https://127.0.0.1:${t.port}/billing.v1.UserService/ListUsers`,
    ]);
    expect(res).toMatchObject({ exitCode: 0, stderr: '' });
    expect((JSON.parse(res.stdout) as { users: unknown[] }).users).toHaveLength(1);
  });
});

describe('TLS settings are checked at start-up', () => {
  const refusal = async (env: Record<string, string>): Promise<string> => {
    let thrown: unknown;
    try {
      const t = await startTestApp(env);
      await t.stop();
    } catch (e) {
      thrown = e;
    }
    expect(thrown).toBeInstanceOf(ConfigError);
    return (thrown as Error).message;
  };

  it('names TLS_CERT_FILE when the certificate file is missing', async () => {
    expect(await refusal({ ...TLS_ENV, TLS_CERT_FILE: fixture('nope.pem') })).toContain('TLS_CERT_FILE');
  });

  it('names TLS_KEY_FILE when the key file is missing', async () => {
    expect(await refusal({ ...TLS_ENV, TLS_KEY_FILE: fixture('nope.key') })).toContain('TLS_KEY_FILE');
  });

  it('names TLS_CLIENT_CA_FILE when the CA file is missing or not a certificate', async () => {
    expect(await refusal({ ...MTLS_ENV, TLS_CLIENT_CA_FILE: fixture('nope.pem') })).toContain('TLS_CLIENT_CA_FILE');
    expect(await refusal({ ...MTLS_ENV, TLS_CLIENT_CA_FILE: fixture('README.md') })).toContain('TLS_CLIENT_CA_FILE');
  });

  it('refuses a certificate with the wrong key', async () => {
    const message = await refusal({ TLS_CERT_FILE: fixture('server.pem'), TLS_KEY_FILE: fixture('client.key') });
    expect(message).toContain('TLS_CERT_FILE');
    expect(message).toContain('TLS_KEY_FILE');
  });

  it('refuses a file that is not PEM as the certificate', async () => {
    expect(await refusal({ ...TLS_ENV, TLS_CERT_FILE: fixture('README.md') })).toContain('TLS_CERT_FILE');
  });
});
