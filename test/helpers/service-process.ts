/**
 * The built service (dist/src/main.js; `npm test` builds it first) as a real
 * child process, with generated clients pointed at it. For tests of what only
 * a process shows: signals, crashes, several replicas. It can also be started
 * the way a user starts it (`npm start` in the repository root).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as eventPb from '../../generated/billing/v1/event_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { createTestDatabase, type TestDatabase } from './database';

export const ROOT = path.resolve(__dirname, '../..');
export const MAIN = path.join(ROOT, 'dist/src/main.js');

export interface ServiceProcess {
  child: ChildProcess;
  port: number;
  /** The metrics listener's port from the ready line (METRICS_PORT set), else null. */
  metricsPort: number | null;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Everything the process wrote so far (stdout and stderr). */
  output(): string;
  /** Its log lines at level error or fatal, so a failing test shows the cause. */
  errors(): string[];
  users: userPb.UserServiceClient;
  wallets: walletPb.WalletServiceClient;
  billing: billingPb.BillingServiceClient;
  jobs: jobPb.JobServiceClient;
  usage: usagePb.UsageServiceClient;
  events: eventPb.EventServiceClient;
  /** Closes the clients (not the process). */
  close(): void;
}

export interface StartOptions {
  /** How long to wait for the ready line (default 30 s). */
  timeoutMs?: number;
  /**
   * The command that starts the service, run in the repository root (default: node dist/src/main.js).
   * With a command (e.g. `['npm', 'start']`) the child leads its own process group, as a shell job does,
   * so a test can signal the group like a terminal's Ctrl-C, and clean-up kills whatever it left behind.
   */
  command?: readonly string[];
}

const spawned = new Set<ChildProcess>();
/** Process groups started with a command: killed as a whole at clean-up (an orphan stays in its group). */
const groups = new Set<number>();

/** Starts the service with exactly this environment (plus PATH); resolves once it logs that it is ready. */
export function startServiceProcess(env: Record<string, string>, options: StartOptions = {}): Promise<ServiceProcess> {
  const { timeoutMs = 30_000, command } = options;
  const [file, ...args] = command ?? [process.execPath, MAIN];
  const child = spawn(file, args, {
    cwd: command === undefined ? undefined : ROOT,
    env: { PATH: process.env.PATH, LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: command !== undefined,
  });
  spawned.add(child);
  if (command !== undefined && child.pid !== undefined) groups.add(child.pid);
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
    const readyPorts = (line: string): { port: number; metricsPort: number | null } | undefined => {
      if (!line.includes('"billing-service ready"')) return undefined;
      try {
        const { port, metricsPort } = JSON.parse(line) as { port?: unknown; metricsPort?: unknown };
        if (typeof port !== 'number') return undefined;
        return { port, metricsPort: typeof metricsPort === 'number' ? metricsPort : null };
      } catch {
        return undefined;
      }
    };
    const onData = (d: Buffer) => {
      stdout += d;
      const lines = stdout.split('\n');
      stdout = lines.pop()!; // the unfinished last line, if any
      const ready = lines.map(readyPorts).find((p) => p !== undefined);
      if (ready === undefined) return;
      const { port, metricsPort } = ready;
      clearTimeout(timer);
      child.stdout!.off('data', onData);
      const address = `127.0.0.1:${port}`;
      const creds = grpc.credentials.createInsecure();
      const clients = {
        users: new userPb.UserServiceClient(address, creds),
        wallets: new walletPb.WalletServiceClient(address, creds),
        billing: new billingPb.BillingServiceClient(address, creds),
        jobs: new jobPb.JobServiceClient(address, creds),
        usage: new usagePb.UsageServiceClient(address, creds),
        events: new eventPb.EventServiceClient(address, creds),
      };
      resolve({
        child,
        port,
        metricsPort,
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
  for (const group of groups) {
    try {
      process.kill(-group, 'SIGKILL');
    } catch {
      /* nothing left in the group */
    }
  }
  groups.clear();
}

/** The processes below `pid` (children, grandchildren, ...) with their command lines, from `ps`. */
export function descendantsOf(pid: number): { pid: number; args: string }[] {
  const rows = execFileSync('ps', ['-e', '-o', 'pid=,ppid=,args='], { encoding: 'utf8' })
    .split('\n')
    .map((line) => /^\s*(\d+)\s+(\d+)\s(.*)$/.exec(line))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ pid: Number(m[1]), ppid: Number(m[2]), args: m[3].trim() }));
  const found: { pid: number; args: string }[] = [];
  const queue = [pid];
  while (queue.length > 0) {
    const parent = queue.shift()!;
    for (const row of rows.filter((r) => r.ppid === parent)) {
      found.push({ pid: row.pid, args: row.args });
      queue.push(row.pid);
    }
  }
  return found;
}

/** Whether a process with this id exists (a zombie counts). */
export function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** A temporary directory and a fresh test database per test, and the service processes a test started. */
export interface ProcessWorkspace {
  /** This test's directory (the usage files, the SQLite database). */
  readonly dir: string;
  /** This test's database (SQLite in `dir`, or a fresh PostgreSQL database). */
  readonly db: TestDatabase;
  /** Processes whose clients are closed after the test (every service process is killed anyway). */
  readonly running: ServiceProcess[];
}

/**
 * For a describe block of tests that run the built service: before each test a
 * new directory (`prefix`) and database; after it, the clients of `running`
 * closed, every service process this file started killed, the database
 * dropped and the directory removed.
 */
export function useProcessWorkspace(prefix: string): ProcessWorkspace {
  let dir = '';
  let db: TestDatabase | null = null;
  const running: ServiceProcess[] = [];
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    for (const s of running.splice(0)) s.close();
    await killServiceProcesses();
    await db?.drop();
    db = null;
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return {
    get dir() {
      return dir;
    },
    get db() {
      if (!db) throw new Error('the workspace exists only inside a test');
      return db;
    },
    running,
  };
}
