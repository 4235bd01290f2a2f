/**
 * The README's "From a fresh start to billed records", run as written: the
 * service is started with the README's own start command (the real `npm start`
 * in the repository root, the shipped data/usage-logs.json, a temporary
 * database), every `$B ...` line of the section's sh blocks runs through `sh`
 * with the README's own `B` and `S` (buf from node_modules instead of
 * `npx buf`, the test service's port instead of 50051), and the outcomes the
 * README states are checked.
 *
 * "Safe at any minute": the environment the start command inherits has
 * INGEST_CRON firing every second, so that a tick of the hourly cron falls
 * between any two commands (they run at a person's pace, just over a second
 * apart). The walkthrough has to hold anyway.
 *
 * Statuses, balances, ledgers and job counts are checked; not the AddFunds
 * response body, and not attempt_count once a record has been settled.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BillingRecordStatus } from '../../generated/billing/v1/billing_service';
import { UserStatus } from '../../generated/billing/v1/user_service';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { BUF, call } from '../helpers/harness';
import { killServiceProcesses, ROOT, startServiceProcess, type ServiceProcess } from '../helpers/service-process';

const SECTION = 'From a fresh start to billed records';

/** The text of one `## ` section of the README. */
function readmeSection(title: string): string {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const start = readme.indexOf(`\n## ${title}\n`);
  if (start < 0) throw new Error(`README has no section "## ${title}"`);
  const end = readme.indexOf('\n## ', start + 1);
  return readme.slice(start, end < 0 ? undefined : end);
}

/** The logical lines of each fenced sh block (continuations joined, comments and blank lines dropped). */
function shBlocks(text: string): string[][] {
  return [...text.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) =>
    m[1]
      .replace(/\\\n/g, ' ')
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line !== '' && !line.startsWith('#')),
  );
}

/** How the section says to start the service: the first command (block line or inline code) running `npm start`. */
function startCommand(text: string, blocks: string[][]): { env: Record<string, string>; command: string[] } {
  const candidates = [...blocks.flat(), ...[...text.matchAll(/`([^`\n]+)`/g)].map((m) => m[1])];
  const line = candidates.find((c) => /(^|\s)npm start(\s|$)/.test(c));
  if (line === undefined) throw new Error('the walkthrough does not say how to start the service (npm start)');
  const words = line.split(/\s+/);
  const env: Record<string, string> = {};
  while (/^[A-Z_][A-Z0-9_]*=/.test(words[0])) {
    const [name, ...value] = words.shift()!.split('=');
    env[name] = value.join('=');
  }
  expect(words).toEqual(['npm', 'start']);
  return { env, command: words };
}

interface Ran {
  line: string;
  /** The RPC the line calls, e.g. "ProcessLogs". */
  method: string;
  exitCode: number;
  stdout: string;
  stderr: string;
}

const sh = (script: string) =>
  new Promise<{ exitCode: number; stdout: string; stderr: string }>((resolve) => {
    execFile('sh', ['-c', script], { cwd: ROOT, timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err ? (err as NodeJS.ErrnoException & { code?: number | string }).code : 0;
      resolve({ exitCode: typeof code === 'number' ? code : -1, stdout, stderr });
    });
  });

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Money as buf curl prints it (proto JSON: units a string, zero fields left out) -> micros. */
const micros = (m: { units?: string; nanos?: number } | undefined): bigint =>
  BigInt(m?.units ?? '0') * 1_000_000n + BigInt(m?.nanos ?? 0) / 1000n;

/** An int64 counter as buf curl prints it (left out when 0). */
const count = (v: string | undefined): number => Number(v ?? '0');

interface JsonRecord {
  userId: string;
  amount: { units?: string; nanos?: number };
  status: string;
}
type JsonMoney = { units?: string; nanos?: number };
interface JsonResult {
  status: string;
  usageId?: string;
}
interface JsonJobRun {
  status: string;
  entriesRead?: string;
  entriesAccepted?: string;
  entriesDuplicate?: string;
  billingRecordsCreated?: string;
  chargesSucceeded?: string;
  retriesScheduled?: string;
}

describe(`README: ${SECTION}`, () => {
  let dir: string;
  let db: TestDatabase;
  let svc: ServiceProcess | undefined;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-walk-'));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    svc?.close();
    await killServiceProcesses();
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('gives the outcomes it states, even with a cron tick between any two of its commands', async () => {
    const text = readmeSection(SECTION);
    const blocks = shBlocks(text);
    const start = startCommand(text, blocks);

    // What the start command inherits: the test's database and port, fast retries, and the worst case of the
    // default hourly cron (a tick at any moment). The command's own assignments (VAR=value npm start) win, as in sh.
    const inherited = { GRPC_PORT: '0', ...db.env, RETRY_BASE_DELAY_MS: '20', INGEST_CRON: '* * * * * *' };
    svc = await startServiceProcess({ ...inherited, ...start.env }, { command: start.command, timeoutMs: 120_000 });
    const { users, wallets, billing } = svc;

    // The README's B and S, pointed at this service.
    const assignments = blocks.flat().filter((line) => /^[BS]=/.test(line));
    const B = assignments.find((line) => line.startsWith('B='));
    const S = assignments.find((line) => line.startsWith('S='));
    expect(B).toMatch(/^B="npx buf curl /);
    expect(S).toBe('S=http://127.0.0.1:50051');
    const prelude = [B!.replace('npx buf', BUF), `S=http://127.0.0.1:${svc.port}`].join('\n');

    const ran: Ran[] = [];
    const runBlock = async (block: string[]) => {
      for (const line of block.filter((l) => l.startsWith('$B '))) {
        await sleep(1100); // a person's pace: a cron tick between any two commands
        const method = /\/billing\.v1\.\w+\/(\w+)/.exec(line)?.[1] ?? '?';
        const result = await sh(`${prelude}\n${line}`);
        expect({ line, exitCode: result.exitCode, stderr: result.stderr }).toEqual({ line, exitCode: 0, stderr: '' });
        ran.push({ line, method, ...result });
      }
    };
    const outputs = (method: string) => ran.filter((r) => r.method === method).map((r) => JSON.parse(r.stdout));

    const commandBlocks = blocks.filter((block) => block.some((line) => line.startsWith('$B ')));
    expect(commandBlocks).toHaveLength(3);
    const [setup, topUp, usage] = commandBlocks;

    // Block 1: three users, three top-ups, ProcessLogs, ListBillingRecords.
    await runBlock(setup);
    expect(outputs('CreateUser').map((o: { user: { id: string; status: string } }) => [o.user.id, o.user.status])).toEqual([
      ['1', 'USER_STATUS_ACTIVE'],
      ['2', 'USER_STATUS_ACTIVE'],
      ['3', 'USER_STATUS_ACTIVE'],
    ]);
    expect(outputs('AddFunds')).toHaveLength(3);
    // "ingest the sample file now": this run, not an earlier one, bills the sample: 3 records, 2 paid at once.
    const first = (outputs('ProcessLogs')[0] as { jobRun: JsonJobRun }).jobRun;
    expect({
      status: first.status,
      accepted: count(first.entriesAccepted),
      created: count(first.billingRecordsCreated),
      charged: count(first.chargesSucceeded),
      retries: count(first.retriesScheduled),
    }).toEqual({ status: 'JOB_RUN_STATUS_SUCCEEDED', accepted: 6, created: 3, charged: 2, retries: 1 });
    // "bills user 1 $12.50, user 2 $54.00 and user 3 $12.50. Users 1 and 3 are PAID at once."
    const listed = (outputs('ListBillingRecords')[0] as { billingRecords: JsonRecord[] }).billingRecords;
    expect(listed.map((r) => [r.userId, String(micros(r.amount))])).toEqual([
      ['1', '12500000'],
      ['2', '54000000'],
      ['3', '12500000'],
    ]);
    expect(listed.filter((r) => r.userId !== '2').map((r) => r.status)).toEqual([
      'BILLING_RECORD_STATUS_PAID',
      'BILLING_RECORD_STATUS_PAID',
    ]);
    // User 2's record is PENDING (or, with retries this fast, already FAILED).
    expect(['BILLING_RECORD_STATUS_PENDING', 'BILLING_RECORD_STATUS_FAILED']).toContain(listed[1].status);

    // "After the 5th retry fails the record is FAILED and user 2 SUSPENDED."
    const recordOf2 = (await call(billing, 'listBillingRecords', { userId: 2n, status: BillingRecordStatus.BILLING_RECORD_STATUS_UNSPECIFIED, pageSize: 10, pageToken: '' }))
      .billingRecords;
    expect(recordOf2).toHaveLength(1);
    const id2 = recordOf2[0].id;
    const deadline = Date.now() + 30_000;
    let record = (await call(billing, 'getBillingRecord', { id: id2 })).billingRecord!;
    while (record.status !== BillingRecordStatus.BILLING_RECORD_STATUS_FAILED && Date.now() < deadline) {
      await sleep(100);
      record = (await call(billing, 'getBillingRecord', { id: id2 })).billingRecord!;
    }
    const balance = async (userId: bigint) => {
      const { balance: b } = await call(wallets, 'getBalance', { userId });
      return String(micros({ units: String(b!.units), nanos: b!.nanos }));
    };
    expect({
      status: BillingRecordStatus[record.status],
      attempts: record.attemptCount, // 1 + MAX_RETRIES, before any settlement
      user2: UserStatus[(await call(users, 'getUser', { id: 2n })).user!.status],
      balances: [await balance(1n), await balance(2n), await balance(3n)],
    }).toEqual({
      status: 'BILLING_RECORD_STATUS_FAILED',
      attempts: 6,
      user2: 'USER_STATUS_SUSPENDED',
      balances: ['87500000', '10000000', '37500000'],
    });

    // Block 2: the top-up settles the failed record and reactivates user 2; ProcessLogs again bills nothing new.
    await runBlock(topUp);
    expect(outputs('AddFunds')).toHaveLength(4);
    expect((outputs('GetUser')[0] as { user: { id: string; status: string } }).user).toMatchObject({
      id: '2',
      status: 'USER_STATUS_ACTIVE',
    });
    const ledger = (outputs('ListWalletTransactions')[0] as {
      transactions: { type: string; amount: { units?: string; nanos?: number } }[];
    }).transactions;
    expect(ledger.map((t) => [t.type, String(micros(t.amount))])).toEqual([
      ['WALLET_TRANSACTION_TYPE_CREDIT', '10000000'],
      ['WALLET_TRANSACTION_TYPE_CREDIT', '50000000'],
      ['WALLET_TRANSACTION_TYPE_DEBIT', '54000000'],
    ]);
    // ListEvents: user 2's suspension (for the record that failed) and reactivation (settled), and the cursor to poll with.
    const suspension = outputs('ListEvents')[0] as unknown as {
      events: { cursor: string; type: string; userId: string; userSuspended?: { billingRecordId: string }; userReactivated?: { settled?: boolean } }[];
      nextCursor: string;
    };
    expect(suspension.events.map((e) => [e.type, e.userId])).toEqual([
      ['user.suspended', '2'],
      ['user.reactivated', '2'],
    ]);
    expect(suspension.events[0].userSuspended!.billingRecordId).toBe(String(id2));
    expect(suspension.events[1].userReactivated).toEqual({ settled: true });
    expect(suspension.nextCursor).toBe(suspension.events[1].cursor);
    // What the watcher of the third terminal printed, as the README lists it: every event of user 2 in order.
    const seen = (await call(svc.events, 'listEvents', { afterCursor: '', types: [], userId: 2n, pageSize: 500 })).events.map((e) => e.type);
    // The balance alerts among them (default threshold 0): a new user starts depleted, $10 recovers, the $54 record
    // depletes, the $50 top-up recovers.
    expect(seen.filter((type) => type.startsWith('balance.'))).toEqual(['balance.recovered', 'balance.depleted', 'balance.recovered']);
    expect(seen.filter((type) => !type.startsWith('balance.'))).toEqual([
      'user.created',
      'wallet.credited',
      'billing_record.created',
      ...Array.from({ length: 5 }, () => 'billing_record.retry_scheduled'),
      'billing_record.failed',
      'user.suspended',
      'wallet.credited',
      'wallet.debited',
      'billing_record.paid',
      'user.reactivated',
    ]);
    const again = outputs('ProcessLogs')[1] as { jobRun: JsonJobRun } | undefined;
    expect(again).toBeDefined(); // the walkthrough runs ProcessLogs a second time
    expect({
      status: again!.jobRun.status,
      read: count(again!.jobRun.entriesRead),
      duplicate: count(again!.jobRun.entriesDuplicate),
      accepted: count(again!.jobRun.entriesAccepted),
      created: count(again!.jobRun.billingRecordsCreated),
    }).toEqual({ status: 'JOB_RUN_STATUS_SUCCEEDED', read: 6, duplicate: 6, accepted: 0, created: 0 });

    const all = (await call(billing, 'listBillingRecords', { userId: 0n, status: BillingRecordStatus.BILLING_RECORD_STATUS_UNSPECIFIED, pageSize: 10, pageToken: '' }))
      .billingRecords;
    expect({
      records: all.map((r) => [String(r.userId), BillingRecordStatus[r.status]]),
      user2: UserStatus[(await call(users, 'getUser', { id: 2n })).user!.status],
      balances: [await balance(1n), await balance(2n), await balance(3n)],
    }).toEqual({
      records: [
        ['1', 'BILLING_RECORD_STATUS_PAID'],
        ['2', 'BILLING_RECORD_STATUS_PAID'],
        ['3', 'BILLING_RECORD_STATUS_PAID'],
      ],
      user2: 'USER_STATUS_ACTIVE',
      balances: ['87500000', '6000000', '37500000'],
    });

    // Block 3: usage over gRPC, the available balance at once, a stream, a summary, and the billing run.
    await runBlock(usage);
    const [recorded] = outputs('RecordUsage') as { results: JsonResult[] }[];
    expect(recorded.results.map((r) => r.status)).toEqual(['USAGE_EVENT_STATUS_ACCEPTED', 'USAGE_EVENT_STATUS_ACCEPTED']);
    const evt2 = recorded.results[1].usageId;
    const [before, after] = (outputs('GetBalance') as { balance: JsonMoney; availableBalance: JsonMoney }[]).map((b) => [
      String(micros(b.balance)),
      String(micros(b.availableBalance)),
    ]);
    // "balance 87.50 and available_balance 84.50"
    expect(before).toEqual(['87500000', '84500000']);
    const streamed = jsonDocs(ran.find((r) => r.method === 'StreamUsage')!.stdout) as { batchId: string; sequence: string; results: JsonResult[] }[];
    expect(streamed.map((a) => [a.batchId, a.sequence, a.results.map((r) => r.status)])).toEqual([
      ['b1', '1', ['USAGE_EVENT_STATUS_ACCEPTED']],
      ['b2', '2', ['USAGE_EVENT_STATUS_DUPLICATE', 'USAGE_EVENT_STATUS_ACCEPTED']],
    ]);
    expect(streamed[1].results[0].usageId).toBe(evt2);
    const [summary] = outputs('GetUsageSummary') as { rows: { service: string; quantity: string; amount: JsonMoney; entries: string }[] }[];
    expect(summary.rows.map((r) => [r.service, r.quantity, String(micros(r.amount)), r.entries])).toEqual([
      ['api-calls', '300', '3000000', '2'],
      ['compute', '5', '500000', '1'],
      ['storage', '10', '500000', '1'],
    ]);
    const third = (outputs('ProcessLogs')[2] as { jobRun: JsonJobRun }).jobRun;
    expect({ status: third.status, duplicate: count(third.entriesDuplicate), created: count(third.billingRecordsCreated), charged: count(third.chargesSucceeded) }).toEqual({
      status: 'JOB_RUN_STATUS_SUCCEEDED',
      duplicate: 6,
      created: 1,
      charged: 1,
    });
    // "one record for user 1 of 4.00, PAID at once, so balance and available_balance are both 83.50"
    expect(after).toEqual(['83500000', '83500000']);
    const user1 = (await call(billing, 'listBillingRecords', { userId: 1n, status: BillingRecordStatus.BILLING_RECORD_STATUS_UNSPECIFIED, pageSize: 10, pageToken: '' }))
      .billingRecords;
    expect(user1.map((r) => [String(micros({ units: String(r.amount!.units), nanos: r.amount!.nanos })), BillingRecordStatus[r.status]])).toEqual([
      ['12500000', 'BILLING_RECORD_STATUS_PAID'],
      ['4000000', 'BILLING_RECORD_STATUS_PAID'],
    ]);
  });
});

/** The JSON documents buf curl prints one after another (a stream's responses). */
function jsonDocs(text: string): unknown[] {
  const docs: unknown[] = [];
  let depth = 0;
  let inString = false;
  let start = -1;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === '\\') i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === '{') {
      if (depth++ === 0) start = i;
    } else if (c === '}' && --depth === 0) docs.push(JSON.parse(text.slice(start, i + 1)));
  }
  return docs;
}
