/**
 * Integration-test harness: the real app on 127.0.0.1 with a free port, a
 * temporary SQLite database and the generated gRPC clients (plaintext by
 * default; a bearer token and TLS on request, see ClientSetup).
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { startApp, type App, type AppOptions } from '../../src/app';
import { loadConfig } from '../../src/config';
import { createTestDatabase } from './database';
import { microsToMoney, parseMoney } from '../../src/shared/money';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import type * as moneyPb from '../../generated/billing/v1/money';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';

/** The usage writer thread's compiled script (`npm test` builds dist/ before the tests). */
export const DIST_USAGE_WRITER = path.resolve(__dirname, '../../dist/src/usage/usage-writer.worker.js');

/** How the harness's clients connect. */
export interface ClientSetup {
  /** Sent as `authorization: Bearer <token>` on every call whose metadata does not carry its own. */
  token?: string;
  /** TLS: the CA that issued the server certificate, plus a client certificate and key for mutual TLS. */
  tls?: { ca: Buffer; cert?: Buffer; key?: Buffer };
}

export interface TestApp {
  app: App;
  port: number;
  /** `127.0.0.1:<port>`, for extra clients. */
  address: string;
  /** The channel credentials and client options the clients use (TLS, token), for extra clients. */
  credentials: grpc.ChannelCredentials;
  clientOptions: grpc.ClientOptions;
  /** The temporary directory holding the database and the usage log file. */
  dir: string;
  users: userPb.UserServiceClient;
  wallets: walletPb.WalletServiceClient;
  billing: billingPb.BillingServiceClient;
  jobs: jobPb.JobServiceClient;
  usage: usagePb.UsageServiceClient;
  /** Closes the clients, stops the app and removes the directory. */
  stop(): Promise<void>;
}

/** `authorization: Bearer <token>` metadata, for a single call. */
export function bearer(token: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/** Channel credentials and client options for a ClientSetup. */
export function clientConnection(setup: ClientSetup = {}): { credentials: grpc.ChannelCredentials; clientOptions: grpc.ClientOptions } {
  const credentials = setup.tls
    ? grpc.credentials.createSsl(setup.tls.ca, setup.tls.key ?? null, setup.tls.cert ?? null)
    : grpc.credentials.createInsecure();
  // The server certificate names localhost (and 127.0.0.1); checking it against the name rather than the
  // IP keeps Node from warning that an IP address is no TLS server name (RFC 6066).
  const base: grpc.ClientOptions = setup.tls ? { 'grpc.ssl_target_name_override': 'localhost' } : {};
  const { token } = setup;
  if (token === undefined) return { credentials, clientOptions: base };
  // A client interceptor rather than call credentials: grpc-js sends call
  // credentials only over TLS, and the tests also need tokens on plaintext.
  const withToken: grpc.Interceptor = (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        if (metadata.get('authorization').length === 0) metadata.set('authorization', `Bearer ${token}`);
        next(metadata, listener);
      },
    });
  return { credentials, clientOptions: { ...base, interceptors: [withToken] } };
}

export async function startTestApp(
  env: Record<string, string> = {},
  opts: AppOptions = {},
  client: ClientSetup = {},
): Promise<TestApp> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-test-'));
  let app: App;
  // An explicit DB_PATH or DATABASE_URL (a test reusing a database across restarts) wins.
  const db = env.DB_PATH || env.DATABASE_URL ? null : await createTestDatabase(dir);
  try {
    const config = loadConfig({
      GRPC_HOST: '127.0.0.1',
      GRPC_PORT: '0',
      ...db?.env,
      LOG_LEVEL: 'silent',
      INGEST_CRON: 'off',
      LOG_FILE_PATH: path.join(dir, 'usage-logs.json'),
      // The usage writer thread runs compiled code: the "sqlite-thread" project (TEST_USAGE_WRITER) or a test's own
      // USAGE_WRITER=thread asks for it, and gets dist's script.
      USAGE_WRITER: process.env.TEST_USAGE_WRITER ?? 'inline',
      ...env,
    });
    app = await startApp(config, config.usageWriter === 'thread' ? { usageWriterScript: DIST_USAGE_WRITER, ...opts } : opts);
  } catch (err) {
    await db?.drop();
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const address = `127.0.0.1:${app.port}`;
  const { credentials, clientOptions } = clientConnection(client);
  const users = new userPb.UserServiceClient(address, credentials, clientOptions);
  const wallets = new walletPb.WalletServiceClient(address, credentials, clientOptions);
  const billing = new billingPb.BillingServiceClient(address, credentials, clientOptions);
  const jobs = new jobPb.JobServiceClient(address, credentials, clientOptions);
  const usage = new usagePb.UsageServiceClient(address, credentials, clientOptions);
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      for (const client of [users, wallets, billing, jobs, usage]) client.close();
      try {
        await app.stop();
      } finally {
        await db?.drop();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    })());
  return { app, port: app.port, address, credentials, clientOptions, dir, users, wallets, billing, jobs, usage, stop };
}

type Callback<Res> = (err: grpc.ServiceError | null, response: Res) => void;

/** The last (fullest) overload every generated unary client method has. */
type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: Callback<Res>,
) => grpc.ClientUnaryCall;

// `any` below only matches method shapes; the inferred types are exact.
type UnaryMethodName<C> = {
  [K in keyof C]: C[K] extends UnaryMethod<any, any> ? (K extends string ? K : never) : never;
}[keyof C];

type RequestOf<F> = F extends UnaryMethod<infer Req, any> ? Req : never;
type ResponseOf<F> = F extends UnaryMethod<any, infer Res> ? Res : never;

export interface CallOptions {
  /** Deadline from now, in ms (default 10 s). */
  deadlineMs?: number;
  metadata?: grpc.Metadata;
}

/** A unary call through a generated client, as a promise: `call(t.users, 'getUser', { id })`. */
export function call<C extends grpc.Client, M extends UnaryMethodName<C>>(
  client: C,
  method: M,
  request: RequestOf<C[M]>,
  opts: CallOptions = {},
): Promise<ResponseOf<C[M]>> {
  const fn = client[method] as unknown as UnaryMethod<RequestOf<C[M]>, ResponseOf<C[M]>>;
  return new Promise((resolve, reject) => {
    fn.call(
      client,
      request,
      opts.metadata ?? new grpc.Metadata(),
      { deadline: Date.now() + (opts.deadlineMs ?? 10_000) },
      (err, response) => (err ? reject(err) : resolve(response)),
    );
  });
}

export const reasonOf = (err: grpc.ServiceError): string | undefined => {
  const value = err.metadata?.get('billing-error-reason')[0];
  return value === undefined ? undefined : String(value);
};

/**
 * Asserts that the call fails with this status code and `billing-error-reason`
 * trailer, and returns the error for further checks.
 */
export async function expectGrpcError(promise: Promise<unknown>, code: grpc.status, reason: string): Promise<grpc.ServiceError> {
  let error: grpc.ServiceError;
  try {
    await promise;
  } catch (err) {
    error = err as grpc.ServiceError;
    expect({ code: grpc.status[error.code], reason: reasonOf(error) }).toEqual({ code: grpc.status[code], reason });
    return error;
  }
  throw new Error(`expected ${grpc.status[code]} with reason ${reason}, but the call succeeded`);
}

/** A USD Money message from a decimal string of units, e.g. money('1.50'). */
export function money(units: string): moneyPb.Money {
  return microsToMoney(parseMoney(units), 'USD');
}

export const BUF = path.resolve(__dirname, '..', '..', 'node_modules', '.bin', 'buf');

export interface BufResult {
  /** buf curl's exit code: 0, or a gRPC error code shifted left by three bits. */
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** Runs `buf curl <args>` (schema from server reflection) and never rejects. */
export function bufCurl(args: string[]): Promise<BufResult> {
  return new Promise((resolve) => {
    execFile(BUF, ['curl', ...args], { timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err ? (err as NodeJS.ErrnoException & { code?: number | string }).code : 0;
      resolve({ exitCode: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });
}
