import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { EntityManager } from '@mikro-orm/knex';
import { service as healthServiceDefinition } from 'grpc-health-check';
import pino from 'pino';
import type { Services } from '../../src/grpc/server';
import { createGrpcServer } from '../../src/grpc/server';
import { startTestApp, type TestApp } from '../helpers/harness';

const BUF = path.resolve(__dirname, '..', '..', 'node_modules', '.bin', 'buf');

interface BufResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Runs `buf curl` (gRPC over h2c, schema from server reflection) and never rejects. */
function bufCurl(args: string[]): Promise<BufResult> {
  return new Promise((resolve) => {
    execFile(
      BUF,
      ['curl', '--protocol', 'grpc', '--http2-prior-knowledge', ...args],
      { timeout: 30_000 },
      (err, stdout, stderr) => {
        const code = err ? (err as NodeJS.ErrnoException & { code?: number | string }).code : 0;
        resolve({ exitCode: typeof code === 'number' ? code : -1, stdout, stderr });
      },
    );
  });
}

type ServingStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

interface HealthClient extends grpc.Client {
  check(
    request: { service: string },
    metadata: grpc.Metadata,
    options: Partial<grpc.CallOptions>,
    callback: (err: grpc.ServiceError | null, response: { status: ServingStatus }) => void,
  ): grpc.ClientUnaryCall;
  watch(request: { service: string }): grpc.ClientReadableStream<{ status: ServingStatus }>;
}

const HealthClient = grpc.makeGenericClientConstructor(
  healthServiceDefinition as unknown as grpc.ServiceDefinition,
  'grpc.health.v1.Health',
) as unknown as new (address: string, creds: grpc.ChannelCredentials) => HealthClient;

function check(client: HealthClient, service: string): Promise<ServingStatus> {
  return new Promise((resolve, reject) => {
    client.check({ service }, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err, res) =>
      err ? reject(err) : resolve(res.status),
    );
  });
}

const BILLING_SERVICES = ['billing.v1.UserService', 'billing.v1.WalletService', 'billing.v1.BillingService', 'billing.v1.JobService', 'billing.v1.UsageService', 'billing.v1.EventService'];
const STANDARD_SERVICES = ['grpc.health.v1.Health', 'grpc.reflection.v1.ServerReflection', 'grpc.reflection.v1alpha.ServerReflection'];
const README = path.resolve(__dirname, '..', '..', 'README.md');

/** Splits a shell command line into words: '...' quoted or separated by spaces (enough for the README's commands). */
function tokenize(line: string): string[] {
  return [...line.matchAll(/'([^']*)'|(\S+)/g)].map((m) => m[1] ?? m[2]);
}

/** The command the pattern's first group finds in the README, with `from` replaced by `to`, as words. */
function readmeCommand(pattern: RegExp, from: string, to: string): string[] {
  const found = pattern.exec(fs.readFileSync(README, 'utf8'));
  if (!found) throw new Error(`README.md has no command matching ${pattern}`);
  return tokenize(found[1].replace(from, to));
}

/** Runs `npx buf curl ...` words with the installed buf (node_modules/.bin/buf, what npx runs). */
function run(words: string[]): Promise<BufResult> {
  expect(words.slice(0, 3)).toEqual(['npx', 'buf', 'curl']);
  return new Promise((resolve) => {
    execFile(BUF, words.slice(2), { timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err ? (err as NodeJS.ErrnoException & { code?: number | string }).code : 0;
      resolve({ exitCode: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });
}

describe('server reflection', () => {
  let t: TestApp;

  beforeAll(async () => {
    t = await startTestApp();
  });

  afterAll(async () => {
    await t?.stop();
  });

  it('lets buf curl call CreateUser with the schema it learns through reflection', async () => {
    const res = await bufCurl([
      '--data',
      '{"email":"r@example.com","name":"R"}',
      `http://127.0.0.1:${t.port}/billing.v1.UserService/CreateUser`,
    ]);
    expect(res).toMatchObject({ exitCode: 0, stderr: '' });
    const body = JSON.parse(res.stdout) as { user: { id: string; email: string; name: string; status: string } };
    expect(body.user).toMatchObject({ email: 'r@example.com', name: 'R', status: 'USER_STATUS_ACTIVE' });
    expect(Number(body.user.id)).toBeGreaterThan(0);
  });

  it('lists every method of the billing services with buf curl --list-methods', async () => {
    const res = await bufCurl(['--list-methods', `http://127.0.0.1:${t.port}`]);
    expect(res.exitCode).toBe(0);
    const methods = res.stdout.trim().split('\n').filter((m) => m.startsWith('billing.v1.')).sort();
    expect(methods).toEqual(
      [
        'billing.v1.BillingService/CreateBillingRecord',
        'billing.v1.BillingService/GetBillingRecord',
        'billing.v1.BillingService/ListBillingRecords',
        'billing.v1.BillingService/ListUsageLogs',
        'billing.v1.BillingService/ProcessBillingRecord',
        'billing.v1.EventService/ListEvents',
        'billing.v1.EventService/WatchEvents',
        'billing.v1.JobService/ListJobRuns',
        'billing.v1.JobService/ProcessAll',
        'billing.v1.JobService/ProcessLogs',
        'billing.v1.JobService/ProcessRetries',
        'billing.v1.UsageService/GetUsageSummary',
        'billing.v1.UsageService/RecordUsage',
        'billing.v1.UsageService/StreamUsage',
        'billing.v1.UserService/ActivateUser',
        'billing.v1.UserService/CreateUser',
        'billing.v1.UserService/DeleteUser',
        'billing.v1.UserService/GetUser',
        'billing.v1.UserService/ListUsers',
        'billing.v1.UserService/SuspendUser',
        'billing.v1.UserService/UpdateUser',
        'billing.v1.WalletService/AddFunds',
        'billing.v1.WalletService/GetBalance',
        'billing.v1.WalletService/GetBalanceAlert',
        'billing.v1.WalletService/GetWallet',
        'billing.v1.WalletService/ListWalletTransactions',
        'billing.v1.WalletService/SetBalanceAlert',
      ].sort(),
    );
  });

  it('lists the billing services, health and reflection itself with buf curl --list-services', async () => {
    const res = await bufCurl(['--list-services', `http://127.0.0.1:${t.port}`]);
    expect(res.exitCode).toBe(0);
    expect(res.stdout.trim().split('\n').sort()).toEqual([...BILLING_SERVICES, ...STANDARD_SERVICES].sort());
  });

  it('lists the health and reflection methods with buf curl --list-methods', async () => {
    const res = await bufCurl(['--list-methods', `http://127.0.0.1:${t.port}`]);
    expect({ exitCode: res.exitCode, stderr: res.stderr }).toEqual({ exitCode: 0, stderr: '' });
    expect(res.stdout.trim().split('\n').filter((m) => !m.startsWith('billing.v1.'))).toEqual([
      'grpc.health.v1.Health/Check',
      'grpc.health.v1.Health/List',
      'grpc.health.v1.Health/Watch',
      'grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
      'grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo',
    ]);
  });

  it("runs the README's health check command as written (schema from reflection alone)", async () => {
    // Deployment > Health checks: `npx buf curl --protocol grpc --http2-prior-knowledge http://HOST:50051/grpc.health.v1.Health/Check`
    const command = readmeCommand(/`(npx buf curl [^`]*grpc\.health\.v1\.Health\/Check)`/, 'http://HOST:50051', `http://127.0.0.1:${t.port}`);
    const res = await run(command);
    expect({ exitCode: res.exitCode, stderr: res.stderr, body: res.stdout && JSON.parse(res.stdout) }).toEqual({
      exitCode: 0,
      stderr: '',
      body: { status: 'SERVING' },
    });
  });

  it('calls the reflection service itself through buf curl, v1 and v1alpha', async () => {
    for (const version of ['v1', 'v1alpha']) {
      const res = await bufCurl([
        '--data',
        '{"list_services":""}',
        `http://127.0.0.1:${t.port}/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`,
      ]);
      expect({ version, exitCode: res.exitCode, stderr: res.stderr }).toEqual({ version, exitCode: 0, stderr: '' });
      const body = JSON.parse(res.stdout) as { listServicesResponse: { service: { name: string }[] } };
      expect(body.listServicesResponse.service.map((x) => x.name).sort()).toEqual([...BILLING_SERVICES, ...STANDARD_SERVICES].sort());
    }
  });

  it('describes google.rpc.ErrorInfo, the error detail type, through reflection', async () => {
    const res = await bufCurl([
      '--data',
      '{"file_containing_symbol":"google.rpc.ErrorInfo"}',
      `http://127.0.0.1:${t.port}/grpc.reflection.v1.ServerReflection/ServerReflectionInfo`,
    ]);
    expect(res.exitCode).toBe(0);
    const body = JSON.parse(res.stdout) as { fileDescriptorResponse?: { fileDescriptorProto: string[] } };
    const file = Buffer.from(body.fileDescriptorResponse!.fileDescriptorProto[0], 'base64').toString('latin1');
    expect(file).toContain('google/rpc/error_details.proto');
    expect(file).toContain('ErrorInfo');
  });

  it("shows the error reason in buf curl's output exactly as the README's Errors section says", async () => {
    const readme = fs.readFileSync(README, 'utf8');
    const block = /```console\n\$ (npx buf curl [^\n]*UserService\/GetUser)\n([\s\S]*?)\n```/.exec(readme);
    expect(block).not.toBeNull();
    const command = tokenize(block![1].replace('http://127.0.0.1:50051', `http://127.0.0.1:${t.port}`));
    const res = await run(command);
    expect(res.exitCode).toBe(grpc.status.NOT_FOUND << 3);
    expect(JSON.parse(res.stderr)).toEqual(JSON.parse(block![2]));
    // And -v shows the reason trailer, as the README says.
    const verbose = await run([...command.slice(0, 3), '-v', ...command.slice(3)]);
    expect(verbose.stderr).toContain('Billing-Error-Reason: USER_NOT_FOUND');
  });

  it('gives buf curl the status code and a google.rpc.ErrorInfo detail for a rejected request', async () => {
    const res = await bufCurl([
      '--data',
      '{"email":"not-an-email","name":"R"}',
      `http://127.0.0.1:${t.port}/billing.v1.UserService/CreateUser`,
    ]);
    // buf curl exits with the gRPC code shifted left by three bits.
    expect(res.exitCode).toBe(grpc.status.INVALID_ARGUMENT << 3);
    const error = JSON.parse(res.stderr) as { code: string; details: { type: string }[] }; // errors go to stderr
    expect(error.code).toBe('invalid_argument');
    expect(error.details.map((d) => d.type)).toEqual(['google.rpc.ErrorInfo']);
  });
});

describe('gRPC health', () => {
  it('reports SERVING for the whole server and for every billing service once the app has started', async () => {
    const t = await startTestApp();
    const health = new HealthClient(`127.0.0.1:${t.port}`, grpc.credentials.createInsecure());
    try {
      expect(await check(health, '')).toBe('SERVING');
      expect(await check(health, 'billing.v1.UserService')).toBe('SERVING');
      for (const name of BILLING_SERVICES) expect(await check(health, name)).toBe('SERVING');
    } finally {
      health.close();
      await t.stop();
    }
  });

  it('returns NOT_FOUND for a service it does not know', async () => {
    const t = await startTestApp();
    const health = new HealthClient(`127.0.0.1:${t.port}`, grpc.credentials.createInsecure());
    try {
      await expect(check(health, 'billing.v1.NoSuchService')).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
    } finally {
      health.close();
      await t.stop();
    }
  });

  it('is NOT_SERVING until setServing(true), and NOT_SERVING again as soon as shutdown starts', async () => {
    // The server alone, without the app: nothing here reaches a service or the database.
    const grpcServer = createGrpcServer({
      fork: () => ({}) as EntityManager,
      services: {} as Services,
      log: pino({ level: 'silent' }),
      currency: 'USD',
    });
    const port = await grpcServer.bind('127.0.0.1', 0);
    const health = new HealthClient(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
    try {
      expect(await check(health, '')).toBe('NOT_SERVING');
      expect(await check(health, 'billing.v1.UserService')).toBe('NOT_SERVING');

      grpcServer.setServing(true);
      expect(await check(health, '')).toBe('SERVING');
      expect(await check(health, 'billing.v1.WalletService')).toBe('SERVING');

      // A watcher sees the switch the moment shutdown begins; its open stream
      // then holds the drain until the grace period forces it closed.
      const watch = health.watch({ service: '' });
      const seen: ServingStatus[] = [];
      const notServing = new Promise<void>((resolve) => {
        watch.on('data', (msg: { status: ServingStatus }) => {
          seen.push(msg.status);
          if (msg.status === 'NOT_SERVING') resolve();
        });
      });
      watch.on('error', () => undefined); // cancelled by the forced shutdown
      await new Promise<void>((resolve) => watch.once('data', () => resolve()));

      const stopped = grpcServer.shutdown(200);
      await notServing;
      await stopped;
      expect(seen).toEqual(['SERVING', 'NOT_SERVING']);
    } finally {
      health.close();
      await grpcServer.shutdown(0);
    }
  });
});
