import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { service as healthServiceDefinition } from 'grpc-health-check';
import pino, { type Logger } from 'pino';
import { ConfigError } from '../../src/config';
import { METHOD_ROLES, parseTokens, rolesFor } from '../../src/grpc/auth';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as eventPb from '../../generated/billing/v1/event_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import {
  bearer,
  bufCurl,
  call,
  expectGrpcError,
  money,
  startTestApp,
  type TestApp,
} from '../helpers/harness';

const { UNAUTHENTICATED, PERMISSION_DENIED } = grpc.status;

const SERVICE_TOKEN = randomBytes(32).toString('hex');
const OPERATOR_TOKEN = randomBytes(32).toString('hex');
const TOKENS = [
  { name: 'checkout', token: SERVICE_TOKEN, role: 'service' },
  { name: 'ops-alice', token: OPERATOR_TOKEN, role: 'operator' },
];

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-auth-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let fileSeq = 0;
/** Writes a tokens file (raw text or a value to JSON-encode) and returns its path. */
function tokensFile(content: unknown): string {
  const file = path.join(tmp, `tokens-${++fileSeq}.json`);
  fs.writeFileSync(file, typeof content === 'string' ? content : JSON.stringify(content), { mode: 0o600 });
  return file;
}

/** A logger with no redaction at all, capturing every line: what our code logs, as it logs it. */
function captureLog(): { log: Logger; text: () => string; lines: () => Record<string, unknown>[] } {
  const out: string[] = [];
  const log = pino({ level: 'trace' }, { write: (line: string) => void out.push(line) });
  return {
    log,
    text: () => out.join(''),
    lines: () => out.map((line) => JSON.parse(line) as Record<string, unknown>),
  };
}

const asService = { metadata: bearer(SERVICE_TOKEN) };
const asOperator = { metadata: bearer(OPERATOR_TOKEN) };

function withAuthorization(...values: string[]): { metadata: grpc.Metadata } {
  const metadata = new grpc.Metadata();
  for (const value of values) metadata.add('authorization', value);
  return { metadata };
}

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
) as unknown as new (address: string, creds: grpc.ChannelCredentials) => HealthClient;

describe('bearer-token authentication', () => {
  let t: TestApp;
  const captured = captureLog();
  let seq = 0;
  const email = () => `auth${++seq}@example.com`;

  beforeAll(async () => {
    t = await startTestApp({ AUTH_TOKENS_FILE: tokensFile(TOKENS) }, { log: captured.log });
  });

  afterAll(async () => {
    await t?.stop();
  });

  async function emailsAsOperator(): Promise<string[]> {
    const { users } = await call(t.users, 'listUsers', { pageSize: 500, pageToken: '', status: 0 }, asOperator);
    return users.map((u) => u.email);
  }

  it('refuses CreateUser without a token with UNAUTHENTICATED/MISSING_TOKEN, and the handler never runs', async () => {
    const address = email();
    const err = await expectGrpcError(
      call(t.users, 'createUser', { email: address, name: 'No Token', requestId: '' }),
      UNAUTHENTICATED,
      'MISSING_TOKEN',
    );
    // The same error scheme as every other error: google.rpc.Status with an ErrorInfo carrying the reason.
    const details = err.metadata.get('grpc-status-details-bin');
    expect(details).toHaveLength(1);
    expect(Buffer.from(details[0] as Buffer).includes('MISSING_TOKEN')).toBe(true);
    expect(Buffer.from(details[0] as Buffer).includes('type.googleapis.com/google.rpc.ErrorInfo')).toBe(true);

    expect(await emailsAsOperator()).not.toContain(address);
    // The adapter never saw the call: no handler log line for it.
    const handled = captured.lines().filter((l) => l.msg === 'rpc' && l.method === 'CreateUser' && l.code === 'OK');
    expect(handled).toHaveLength(0);
  });

  it('refuses an unknown token with UNAUTHENTICATED/INVALID_TOKEN', async () => {
    const address = email();
    const unknown = [
      randomBytes(32).toString('hex'), // same length as the real ones
      SERVICE_TOKEN.slice(0, 32), // a prefix of a real one
      `${SERVICE_TOKEN}0`, // a real one with more after it
      SERVICE_TOKEN.toUpperCase(), // tokens are case-sensitive
    ];
    for (const token of unknown) {
      await expectGrpcError(
        call(t.users, 'createUser', { email: address, name: 'Bad Token', requestId: '' }, { metadata: bearer(token) }),
        UNAUTHENTICATED,
        'INVALID_TOKEN',
      );
    }
    expect(await emailsAsOperator()).not.toContain(address);
  });

  it.each([
    ['Basic credentials', ['Basic Y2hlY2tvdXQ6c2VjcmV0']],
    ['"Bearer" alone', ['Bearer']],
    ['a token without the Bearer scheme', [SERVICE_TOKEN]],
    ['two words after Bearer', [`Bearer ${SERVICE_TOKEN} extra`]],
    // HTTP/2 allows one authorization header; a comma-joined pair arrives as two values.
    ['two comma-joined credentials', [`Bearer ${SERVICE_TOKEN}, Bearer ${OPERATOR_TOKEN}`]],
  ])('refuses a malformed authorization (%s) with UNAUTHENTICATED/MALFORMED_TOKEN', async (_what, values) => {
    const address = email();
    await expectGrpcError(
      call(t.users, 'createUser', { email: address, name: 'Malformed', requestId: '' }, withAuthorization(...values)),
      UNAUTHENTICATED,
      'MALFORMED_TOKEN',
    );
    expect(await emailsAsOperator()).not.toContain(address);
  });

  it('accepts the Bearer scheme in any case', async () => {
    const res = await call(
      t.users,
      'createUser',
      { email: email(), name: 'Case', requestId: '' },
      withAuthorization(`bearer ${SERVICE_TOKEN}`),
    );
    expect(res.user!.id).toBeGreaterThan(0n);
  });

  it('lets a service token use users, wallets and billing', async () => {
    const { user } = await call(t.users, 'createUser', { email: email(), name: 'Svc', requestId: 'svc-1' }, asService);
    const userId = user!.id;
    expect((await call(t.users, 'getUser', { id: userId }, asService)).user!.name).toBe('Svc');
    expect((await call(t.users, 'listUsers', { pageSize: 10, pageToken: '', status: 0 }, asService)).users.length).toBeGreaterThan(0);
    expect((await call(t.users, 'updateUser', { id: userId, name: 'Svc 2' }, asService)).user!.name).toBe('Svc 2');

    await call(t.wallets, 'addFunds', { userId, amount: money('10'), requestId: 'svc-topup' }, asService);
    expect((await call(t.wallets, 'getBalance', { userId }, asService)).balance).toEqual(money('10'));
    expect((await call(t.wallets, 'getWallet', { userId }, asService)).wallet!.userId).toBe(userId);
    expect((await call(t.wallets, 'listWalletTransactions', { userId, pageSize: 10, pageToken: '' }, asService)).transactions).toHaveLength(1);

    const created = await call(
      t.billing,
      'createBillingRecord',
      { userId, amount: money('2.5'), description: 'service call', requestId: 'svc-rec' },
      asService,
    );
    const id = created.billingRecord!.id;
    const got = await call(t.billing, 'getBillingRecord', { id }, asService);
    expect(got.billingRecord!.amount).toEqual(money('2.5'));
    expect(got.billingRecord!.status).toBe(billingPb.BillingRecordStatus.BILLING_RECORD_STATUS_PAID);
    await call(t.billing, 'processBillingRecord', { id }, asService);
    expect((await call(t.billing, 'listBillingRecords', { userId, status: 0, pageSize: 10, pageToken: '' }, asService)).billingRecords).toHaveLength(1);
    await call(t.billing, 'listUsageLogs', { source: 0, userId, status: 0, pageSize: 10, pageToken: '' }, asService);
    expect((await call(t.wallets, 'getBalance', { userId }, asService)).balance).toEqual(money('7.5'));
  });

  it('refuses SuspendUser, ActivateUser and DeleteUser to a service token with PERMISSION_DENIED/ROLE_NOT_ALLOWED, changing nothing', async () => {
    const { user } = await call(t.users, 'createUser', { email: email(), name: 'Target', requestId: '' }, asService);
    const id = user!.id;
    await expectGrpcError(call(t.users, 'suspendUser', { id, reason: 'nope' }, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');
    await expectGrpcError(call(t.users, 'activateUser', { id }, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');
    // Zero balance and nothing unpaid: DeleteUser would succeed if it ran.
    await expectGrpcError(call(t.users, 'deleteUser', { id }, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');

    const after = (await call(t.users, 'getUser', { id }, asOperator)).user!;
    expect(after.status).toBe(userPb.UserStatus.USER_STATUS_ACTIVE);
    expect(after.suspensionReason).toBe('');
  });

  it('refuses every JobService RPC to a service token, and no job runs', async () => {
    await expectGrpcError(call(t.jobs, 'processLogs', {}, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');
    await expectGrpcError(call(t.jobs, 'processRetries', {}, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');
    await expectGrpcError(call(t.jobs, 'processAll', {}, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');
    await expectGrpcError(call(t.jobs, 'listJobRuns', { pageSize: 10, pageToken: '' }, asService), PERMISSION_DENIED, 'ROLE_NOT_ALLOWED');
    expect((await call(t.jobs, 'listJobRuns', { pageSize: 10, pageToken: '' }, asOperator)).jobRuns).toHaveLength(0);
  });

  it('lets an operator token call everything', async () => {
    const { user } = await call(t.users, 'createUser', { email: email(), name: 'Op', requestId: '' }, asOperator);
    const id = user!.id;
    await call(t.wallets, 'getBalance', { userId: id }, asOperator);
    await call(t.billing, 'listBillingRecords', { userId: id, status: 0, pageSize: 1, pageToken: '' }, asOperator);
    expect((await call(t.users, 'suspendUser', { id, reason: 'review' }, asOperator)).user!.status).toBe(
      userPb.UserStatus.USER_STATUS_SUSPENDED,
    );
    expect((await call(t.users, 'activateUser', { id }, asOperator)).user!.status).toBe(userPb.UserStatus.USER_STATUS_ACTIVE);
    await call(t.users, 'deleteUser', { id }, asOperator);
    expect(await emailsAsOperator()).not.toContain(user!.email);

    await call(t.jobs, 'processLogs', {}, asOperator);
    await call(t.jobs, 'processRetries', {}, asOperator);
    await call(t.jobs, 'processAll', {}, asOperator);
    expect((await call(t.jobs, 'listJobRuns', { pageSize: 10, pageToken: '' }, asOperator)).jobRuns.length).toBeGreaterThanOrEqual(3);
  });

  it('answers gRPC health checks without a token', async () => {
    const health = new HealthClient(t.address, grpc.credentials.createInsecure());
    try {
      const status = await new Promise<ServingStatus>((resolve, reject) =>
        health.check({ service: 'billing.v1.UserService' }, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err, res) =>
          err ? reject(err) : resolve(res.status),
        ),
      );
      expect(status).toBe('SERVING');
    } finally {
      health.close();
    }
  });

  it('serves reflection without a token (buf curl --list-services)', async () => {
    const res = await bufCurl(['--protocol', 'grpc', '--http2-prior-knowledge', '--list-services', `http://127.0.0.1:${t.port}`]);
    expect(res.exitCode).toBe(0);
    expect(res.stdout.trim().split('\n').sort()).toEqual(
      [
        'billing.v1.BillingService',
        'billing.v1.EventService',
        'billing.v1.JobService',
        'billing.v1.UsageService',
        'billing.v1.UserService',
        'billing.v1.WalletService',
        'grpc.health.v1.Health',
        'grpc.reflection.v1.ServerReflection',
        'grpc.reflection.v1alpha.ServerReflection',
      ].sort(),
    );
  });

  it('lets buf curl call CreateUser with a token header, and refuses it without one', async () => {
    const url = `http://127.0.0.1:${t.port}/billing.v1.UserService/CreateUser`;
    const base = ['--protocol', 'grpc', '--http2-prior-knowledge'];
    const address = email();

    const refused = await bufCurl([...base, '-d', JSON.stringify({ email: address, name: 'Curl' }), url]);
    expect(refused.exitCode).toBe(UNAUTHENTICATED << 3);
    const error = JSON.parse(refused.stderr) as { code: string; details: { type: string; value: string }[] };
    expect(error.code).toBe('unauthenticated');
    expect(error.details.map((d) => d.type)).toEqual(['google.rpc.ErrorInfo']);

    const ok = await bufCurl([...base, '-H', `Authorization: Bearer ${SERVICE_TOKEN}`, '-d', JSON.stringify({ email: address, name: 'Curl' }), url]);
    expect(ok).toMatchObject({ exitCode: 0, stderr: '' });
    expect((JSON.parse(ok.stdout) as { user: { email: string } }).user.email).toBe(address);
  });

  it('logs the caller name on every RPC line and never a token (checked last, over everything above)', () => {
    const text = captured.text();
    const lines = captured.lines();
    const rpcLines = lines.filter((l) => l.msg === 'rpc');
    // Non-vacuous: the calls above produced admitted and refused lines for both callers.
    expect(rpcLines.some((l) => l.code === 'OK' && l.caller === 'checkout')).toBe(true);
    expect(rpcLines.some((l) => l.code === 'OK' && l.caller === 'ops-alice')).toBe(true);
    expect(rpcLines.some((l) => l.code === 'PERMISSION_DENIED' && l.caller === 'checkout' && l.reason === 'ROLE_NOT_ALLOWED')).toBe(true);
    expect(rpcLines.some((l) => l.code === 'UNAUTHENTICATED' && l.reason === 'INVALID_TOKEN')).toBe(true);
    // Every admitted billing RPC names its caller.
    for (const line of rpcLines.filter((l) => l.code === 'OK')) expect(['checkout', 'ops-alice']).toContain(line.caller);

    expect(text).not.toContain(SERVICE_TOKEN);
    expect(text).not.toContain(OPERATOR_TOKEN);
    expect(text.toLowerCase()).not.toContain(SERVICE_TOKEN.slice(0, 16));
    expect(text.toLowerCase()).not.toContain(OPERATOR_TOKEN.slice(0, 16));
  });
});

describe('AUTH_TOKENS_FILE validation at start-up', () => {
  const good = (over: Record<string, unknown> = {}) => ({ name: 'svc', token: randomBytes(32).toString('hex'), role: 'service', ...over });
  const secret = randomBytes(32).toString('hex');

  it.each<[string, () => string]>([
    ['a missing file', () => path.join(tmp, 'no-such-file.json')],
    ['bad JSON', () => tokensFile(`[{"name": "svc", "token": "${secret}", "role": "service"`)],
    ['an object instead of a list', () => tokensFile({ svc: secret })],
    ['an empty list', () => tokensFile([])],
    ['a duplicate token', () => tokensFile([good({ name: 'a', token: secret }), good({ name: 'b', token: secret })])],
    ['a duplicate name', () => tokensFile([good({ name: 'a' }), good({ name: 'a' })])],
    ['a short token', () => tokensFile([good({ token: 'fifteen-chars15' })])],
    ['a token with a space', () => tokensFile([good({ token: `${secret.slice(0, 20)} ${secret.slice(20)}` })])],
    ['a token with a comma', () => tokensFile([good({ token: `${secret.slice(0, 20)},${secret.slice(20)}` })])],
    ['an unknown role', () => tokensFile([good({ role: 'admin' })])],
    ['a missing role', () => tokensFile([{ name: 'svc', token: secret }])],
    ['an unknown field', () => tokensFile([good({ rol: 'operator' })])],
    ['a token used as a key', () => tokensFile([{ [secret]: 'service' }])],
    ['an empty name', () => tokensFile([good({ name: '' })])],
    ['a numeric token', () => tokensFile([good({ token: 12345678901234567890 })])],
  ])('refuses %s with a ConfigError naming AUTH_TOKENS_FILE, and never quotes a token', async (_what, file) => {
    let thrown: unknown;
    try {
      const t = await startTestApp({ AUTH_TOKENS_FILE: file() });
      await t.stop();
    } catch (e) {
      thrown = e;
    }
    expect(thrown).toBeInstanceOf(ConfigError);
    const message = (thrown as Error).message;
    expect(message).toContain('AUTH_TOKENS_FILE');
    expect(message).not.toContain(secret);
    expect(message).not.toContain(secret.slice(0, 20));
  });

  it('accepts the minimum: one 16-character token', () => {
    const table = parseTokens(JSON.stringify([{ name: 'svc', token: 'abcdefghijklmnop', role: 'service' }]));
    expect(table.authenticate('abcdefghijklmnop')).toEqual({ name: 'svc', role: 'service' });
    expect(table.authenticate('abcdefghijklmno')).toBeNull();
  });

  it('accepts openssl rand -base64 tokens (with + / =)', () => {
    const token = randomBytes(32).toString('base64');
    expect(token).toMatch(/[+/=]|^[A-Za-z0-9]+$/);
    expect(parseTokens(JSON.stringify([{ name: 'ops', token, role: 'operator' }])).authenticate(token)).toEqual({
      name: 'ops',
      role: 'operator',
    });
  });
});

describe('the role table', () => {
  const services = [userPb.UserServiceService, walletPb.WalletServiceService, billingPb.BillingServiceService, jobPb.JobServiceService, usagePb.UsageServiceService, eventPb.EventServiceService];
  const paths = services.flatMap((s) => Object.values(s).map((m) => m.path)).sort();
  const OPERATOR_ONLY = [
    '/billing.v1.UserService/DeleteUser',
    '/billing.v1.UserService/SuspendUser',
    '/billing.v1.UserService/ActivateUser',
    '/billing.v1.WalletService/SetBalanceAlert',
    ...Object.values(jobPb.JobServiceService).map((m) => m.path),
  ];

  it('lists every billing RPC, and nothing else', () => {
    expect(Object.keys(METHOD_ROLES).sort()).toEqual(paths);
  });

  it('gives operators everything and services all but the operator-only RPCs', () => {
    for (const p of paths) {
      expect([p, rolesFor(p)]).toEqual([p, OPERATOR_ONLY.includes(p) ? ['operator'] : ['service', 'operator']]);
    }
  });

  it('leaves health and reflection open and makes an unknown method operator-only', () => {
    expect(rolesFor('/grpc.health.v1.Health/Check')).toBe('open');
    expect(rolesFor('/grpc.health.v1.Health/Watch')).toBe('open');
    expect(rolesFor('/grpc.reflection.v1.ServerReflection/ServerReflectionInfo')).toBe('open');
    expect(rolesFor('/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo')).toBe('open');
    expect(rolesFor('/billing.v1.UserService/NewThing')).toEqual(['operator']);
  });
});

describe('secure by default', () => {
  it('refuses to start on 0.0.0.0 without AUTH_TOKENS_FILE and ALLOW_INSECURE', async () => {
    let thrown: unknown;
    try {
      const t = await startTestApp({ GRPC_HOST: '0.0.0.0' });
      await t.stop();
    } catch (e) {
      thrown = e;
    }
    expect(thrown).toBeInstanceOf(ConfigError);
    expect((thrown as Error).message).toContain('GRPC_HOST');
    expect((thrown as Error).message).toContain('AUTH_TOKENS_FILE');
    expect((thrown as Error).message).toContain('ALLOW_INSECURE');
  });

  it('starts on 0.0.0.0 with ALLOW_INSECURE=true, without authentication, and logs an INSECURE warning', async () => {
    const captured = captureLog();
    const t = await startTestApp({ GRPC_HOST: '0.0.0.0', ALLOW_INSECURE: 'true' }, { log: captured.log });
    try {
      await call(t.users, 'createUser', { email: 'open@example.com', name: 'Open', requestId: '' });
      const warnings = captured.lines().filter((l) => l.level === 40 && l.security === true);
      expect(warnings).toHaveLength(1);
      expect(String(warnings[0].msg)).toMatch(/^INSECURE: authentication is OFF/);
      expect(captured.lines().find((l) => l.msg === 'billing-service ready')).toMatchObject({ auth: 'off', transport: 'plaintext' });
    } finally {
      await t.stop();
    }
  });

  it('starts on 0.0.0.0 with tokens but no TLS, warning that tokens travel in clear text', async () => {
    const captured = captureLog();
    const t = await startTestApp({ GRPC_HOST: '0.0.0.0', AUTH_TOKENS_FILE: tokensFile(TOKENS) }, { log: captured.log });
    try {
      await expectGrpcError(call(t.users, 'getUser', { id: 1n }), UNAUTHENTICATED, 'MISSING_TOKEN');
      const warnings = captured.lines().filter((l) => l.level === 40 && l.security === true);
      expect(warnings).toHaveLength(1);
      expect(String(warnings[0].msg)).toContain('clear text');
      expect(captured.lines().find((l) => l.msg === 'billing-service ready')).toMatchObject({ auth: 'tokens (2)' });
    } finally {
      await t.stop();
    }
  });

  it('logs no security warning on 127.0.0.1 without tokens (the default)', async () => {
    const captured = captureLog();
    const t = await startTestApp({}, { log: captured.log });
    try {
      expect(captured.lines().filter((l) => l.level === 40)).toEqual([]);
    } finally {
      await t.stop();
    }
  });
});
