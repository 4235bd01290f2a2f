/**
 * Integration-test harness: the real app on 127.0.0.1 with a free port, a
 * temporary SQLite database and the generated gRPC clients.
 */
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
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';

export interface TestApp {
  app: App;
  port: number;
  /** The temporary directory holding the database and the usage log file. */
  dir: string;
  users: userPb.UserServiceClient;
  wallets: walletPb.WalletServiceClient;
  billing: billingPb.BillingServiceClient;
  jobs: jobPb.JobServiceClient;
  /** Closes the clients, stops the app and removes the directory. */
  stop(): Promise<void>;
}

export async function startTestApp(env: Record<string, string> = {}, opts: AppOptions = {}): Promise<TestApp> {
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
      ...env,
    });
    app = await startApp(config, opts);
  } catch (err) {
    await db?.drop();
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const address = `127.0.0.1:${app.port}`;
  const creds = grpc.credentials.createInsecure();
  const users = new userPb.UserServiceClient(address, creds);
  const wallets = new walletPb.WalletServiceClient(address, creds);
  const billing = new billingPb.BillingServiceClient(address, creds);
  const jobs = new jobPb.JobServiceClient(address, creds);
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      for (const client of [users, wallets, billing, jobs]) client.close();
      try {
        await app.stop();
      } finally {
        await db?.drop();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    })());
  return { app, port: app.port, dir, users, wallets, billing, jobs, stop };
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
