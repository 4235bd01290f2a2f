/**
 * The built service (dist/src/main.js; `npm test` builds it first) as a real
 * child process, with generated clients pointed at it. For tests of what only
 * a process shows: signals, crashes, several replicas.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';

export const MAIN = path.resolve(__dirname, '../../dist/src/main.js');

export interface ServiceProcess {
  child: ChildProcess;
  port: number;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Everything the process wrote so far (stdout and stderr). */
  output(): string;
  /** Its log lines at level error or fatal, so a failing test shows the cause. */
  errors(): string[];
  users: userPb.UserServiceClient;
  wallets: walletPb.WalletServiceClient;
  billing: billingPb.BillingServiceClient;
  jobs: jobPb.JobServiceClient;
  /** Closes the clients (not the process). */
  close(): void;
}

const spawned = new Set<ChildProcess>();

/** Starts the service with exactly this environment (plus PATH); resolves once it logs that it is ready. */
export function startServiceProcess(env: Record<string, string>, timeoutMs = 30_000): Promise<ServiceProcess> {
  const child = spawn(process.execPath, [MAIN], {
    env: { PATH: process.env.PATH, LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  spawned.add(child);
  // Keep the last 1 MB of output: enough for failure messages, bounded for long runs.
  let out = '';
  const keep = (d: Buffer) => {
    out += d;
    if (out.length > 1_000_000) out = out.slice(-1_000_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => {
      spawned.delete(child);
      resolve({ code, signal });
    }),
  );
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`service did not start within ${timeoutMs} ms:\n${out}`)), timeoutMs);
    // The ready line is looked for in stdout alone and only among complete lines, so that a chunk boundary
    // or stderr output in between never hands a partial line to JSON.parse.
    let stdout = '';
    const readyPort = (line: string): number | undefined => {
      if (!line.includes('"billing-service ready"')) return undefined;
      try {
        const port: unknown = JSON.parse(line).port;
        return typeof port === 'number' ? port : undefined;
      } catch {
        return undefined;
      }
    };
    const onData = (d: Buffer) => {
      stdout += d;
      const lines = stdout.split('\n');
      stdout = lines.pop()!; // the unfinished last line, if any
      const port = lines.map(readyPort).find((p) => p !== undefined);
      if (port === undefined) return;
      clearTimeout(timer);
      child.stdout!.off('data', onData);
      const address = `127.0.0.1:${port}`;
      const creds = grpc.credentials.createInsecure();
      const clients = {
        users: new userPb.UserServiceClient(address, creds),
        wallets: new walletPb.WalletServiceClient(address, creds),
        billing: new billingPb.BillingServiceClient(address, creds),
        jobs: new jobPb.JobServiceClient(address, creds),
      };
      resolve({
        child,
        port,
        exit,
        output: () => out,
        errors: () => out.split('\n').filter((line) => /"level":(50|60)/.test(line)),
        ...clients,
        close: () => Object.values(clients).forEach((c) => c.close()),
      });
    };
    child.stdout!.on('data', onData);
    void exit.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`service exited (${code ?? signal}) before it was ready:\n${out}`));
    });
  });
}

/** SIGKILLs every service process still running (for afterEach, so a failed test leaves nothing behind). */
export async function killServiceProcesses(): Promise<void> {
  const alive = [...spawned];
  await Promise.all(alive.map((c) => new Promise((resolve) => (c.once('exit', resolve), c.kill('SIGKILL')))));
}
