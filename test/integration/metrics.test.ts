/**
 * The Prometheus listener (METRICS_PORT): the real app on 127.0.0.1:0 with its
 * metrics on 127.0.0.1:0, calls through the generated clients, scrapes over
 * HTTP read by the test's own parser of the text format (../helpers/prometheus.ts).
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as eventPb from '../../generated/billing/v1/event_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import { createTestDatabase, type TestDatabase } from '../helpers/database';
import { append, eventually, userCreated, Watch } from '../helpers/events';
import { bearer, call, expectGrpcError, money, startTestApp, type TestApp } from '../helpers/harness';
import { httpRequest, samplesOf, scrape, seriesOf, valueOf, type Exposition } from '../helpers/prometheus';
import { killServiceProcesses, startServiceProcess } from '../helpers/service-process';
import { entry, writeNdjson } from '../helpers/usage';

const OPERATOR_TOKEN = randomBytes(32).toString('hex');

/** The app with authentication on (one operator token, sent by the clients) and metrics on a free port. */
async function startWithMetrics(env: Record<string, string> = {}): Promise<TestApp> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-metrics-tokens-'));
  const tokens = path.join(dir, 'tokens.json');
  fs.writeFileSync(tokens, JSON.stringify([{ name: 'ops', token: OPERATOR_TOKEN, role: 'operator' }]), { mode: 0o600 });
  try {
    return await startTestApp(
      { METRICS_PORT: '0', AUTH_TOKENS_FILE: tokens, MAX_RETRIES: '1', ...env },
      // No background retries: every charge attempt below is one the test makes.
      { scheduler: false },
      { token: OPERATOR_TOKEN },
    );
  } finally {
    // The tokens are read at start-up.
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Listening TCP servers of this process (the gRPC listener and, when on, the metrics listener). */
const listeningServers = () => process.getActiveResourcesInfo().filter((r) => r === 'TCPServerWrap').length;

/** Every histogram series: buckets never decrease, and the +Inf bucket equals _count. */
function expectWellFormedHistogram(exposition: Exposition, name: string): void {
  for (const count of samplesOf(exposition, `${name}_count`)) {
    const buckets = samplesOf(exposition, `${name}_bucket`, count.labels).sort(
      (a, b) => Number(a.labels.le === '+Inf' ? Infinity : a.labels.le) - Number(b.labels.le === '+Inf' ? Infinity : b.labels.le),
    );
    expect(buckets.length).toBeGreaterThan(1);
    for (let i = 1; i < buckets.length; i++) expect(buckets[i].value).toBeGreaterThanOrEqual(buckets[i - 1].value);
    expect(buckets[buckets.length - 1]).toMatchObject({ labels: { le: '+Inf' }, value: count.value });
    expect(valueOf(exposition, `${name}_sum`, count.labels)).toBeGreaterThanOrEqual(0);
  }
}

describe('Prometheus metrics', () => {
  let t: TestApp | undefined;
  afterEach(async () => {
    await t?.stop();
    t = undefined;
  });

  it('a scrape after refused, OK, NOT_FOUND, ingestion and failed-charge calls shows their exact counts', async () => {
    t = await startWithMetrics();
    const port = t.app.metricsPort!;
    expect(port).toBeGreaterThan(0);

    // Before any call: the fixed series exist at 0, no RPC has been counted.
    const before = await scrape(port);
    expect(seriesOf(before, 'billing_rpc_calls_total')).toEqual({});
    expect(valueOf(before, 'billing_charge_attempts_total', { outcome: 'charged', trigger: 'new' })).toBe(0);
    expect(valueOf(before, 'billing_usage_entries_total', { outcome: 'billed', source: 'file' })).toBe(0);
    expect(valueOf(before, 'billing_retries_pending')).toBe(0);

    // Refused by the interceptor: no token.
    await expectGrpcError(call(t.users, 'getUser', { id: 1n }, { metadata: bearer('not-a-token-but-long-enough') }), grpc.status.UNAUTHENTICATED, 'INVALID_TOKEN');
    const { user: payer } = await call(t.users, 'createUser', { email: 'payer@example.com', name: 'Payer', requestId: '' });
    const { user: broke } = await call(t.users, 'createUser', { email: 'broke@example.com', name: 'Broke', requestId: '' });
    await call(t.wallets, 'addFunds', { userId: payer!.id, amount: money('100'), requestId: '' });
    await expectGrpcError(call(t.users, 'getUser', { id: 999n }), grpc.status.NOT_FOUND, 'USER_NOT_FOUND');

    // Ingestion: 2 billed, 2 pending (unknown user, no price), 1 rejected; then the same file again: 5 duplicates.
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [
      entry(Number(payer!.id), 'api-calls', 100, { id: 'a' }),
      entry(Number(payer!.id), 'storage', 10, { id: 'b' }),
      entry(4242, 'api-calls', 5, { id: 'c' }),
      entry(Number(payer!.id), 'teleportation', 1, { id: 'd' }),
      entry(Number(payer!.id), 'api-calls', -3, { id: 'e' }),
    ]);
    const first = (await call(t.jobs, 'processLogs', {})).jobRun!;
    expect(first).toMatchObject({
      status: jobPb.JobRunStatus.JOB_RUN_STATUS_SUCCEEDED,
      entriesRead: 5n,
      entriesAccepted: 4n,
      entriesRejected: 1n,
      chargesSucceeded: 1n,
    });
    const second = (await call(t.jobs, 'processLogs', {})).jobRun!;
    expect(second).toMatchObject({ entriesRead: 5n, entriesDuplicate: 5n, billingRecordsCreated: 0n });
    // The same id with other content: a conflict (file).
    writeNdjson(path.join(t.dir, 'usage-logs.json'), [entry(Number(payer!.id), 'api-calls', 100, { id: 'a' }), entry(Number(payer!.id), 'storage', 11, { id: 'b' })]);
    expect((await call(t.jobs, 'processLogs', {})).jobRun!).toMatchObject({ entriesRead: 2n, entriesDuplicate: 1n, entriesConflict: 1n });
    // Usage over gRPC: accepted, pending (unknown user), rejected (bad quantity); then a duplicate and a conflict.
    const at = new Date('2026-11-02T10:00:00Z');
    const ev = (id: string, userId: bigint, quantity: string) => ({ id, userId, service: 'api-calls', quantity, time: at });
    await call(t.usage, 'recordUsage', { events: [ev('x1', payer!.id, '1'), ev('x2', 4243n, '1'), ev('x3', payer!.id, '-1')] });
    await call(t.usage, 'recordUsage', { events: [ev('x1', payer!.id, '1'), ev('x1', payer!.id, '2')] });

    // A charge that fails: the first attempt schedules a retry, the last one (MAX_RETRIES=1) fails and suspends.
    const created = await call(t.billing, 'createBillingRecord', { userId: broke!.id, amount: money('5'), description: 'setup fee', requestId: '' });
    expect(created.outcome).toBe(billingPb.ChargeOutcome.CHARGE_OUTCOME_RETRY_SCHEDULED);
    const midway = await scrape(port);
    expect(valueOf(midway, 'billing_retries_pending')).toBe(1);
    const processed = await call(t.billing, 'processBillingRecord', { id: created.billingRecord!.id });
    expect(processed.outcome).toBe(billingPb.ChargeOutcome.CHARGE_OUTCOME_FAILED);

    const m = await scrape(port);
    expect(seriesOf(m, 'billing_rpc_calls_total')).toEqual({
      'code=UNAUTHENTICATED,method=GetUser': 1,
      'code=OK,method=CreateUser': 2,
      'code=OK,method=AddFunds': 1,
      'code=NOT_FOUND,method=GetUser': 1,
      'code=OK,method=ProcessLogs': 3,
      'code=OK,method=RecordUsage': 2,
      'code=OK,method=CreateBillingRecord': 1,
      'code=OK,method=ProcessBillingRecord': 1,
    });
    // The histogram saw the same calls.
    expect(seriesOf(m, 'billing_rpc_duration_seconds_count')).toEqual(seriesOf(m, 'billing_rpc_calls_total'));
    expectWellFormedHistogram(m, 'billing_rpc_duration_seconds');

    // Every outcome and source exists (at 0 until counted).
    const usageSeries = seriesOf(m, 'billing_usage_entries_total');
    expect(Object.keys(usageSeries)).toHaveLength(12);
    expect(Object.fromEntries(Object.entries(usageSeries).filter(([, v]) => v > 0))).toEqual({
      'outcome=billed,source=file': 2,
      'outcome=pending,source=file': 2,
      'outcome=rejected,source=file': 1,
      'outcome=duplicate,source=file': 6,
      'outcome=conflict,source=file': 1,
      'outcome=accepted,source=api': 1,
      'outcome=pending,source=api': 1,
      'outcome=rejected,source=api': 1,
      'outcome=duplicate,source=api': 1,
      'outcome=conflict,source=api': 1,
    });
    const attempts = Object.fromEntries(Object.entries(seriesOf(m, 'billing_charge_attempts_total')).filter(([, v]) => v > 0));
    expect(attempts).toEqual({
      'outcome=charged,trigger=new': 1, // the usage record of the first run
      'outcome=retry_scheduled,trigger=new': 1,
      'outcome=failed,trigger=manual': 1,
    });
    expect(valueOf(m, 'billing_users_suspended_total')).toBe(1);
    expect(valueOf(m, 'billing_retries_pending')).toBe(0);
    expect(seriesOf(m, 'billing_job_run_duration_seconds_count')).toEqual({ 'kind=PROCESS_LOGS,status=SUCCEEDED': 3 });
    expectWellFormedHistogram(m, 'billing_job_run_duration_seconds');

    // Process metrics, from the same registry.
    expect(m.types.get('process_cpu_user_seconds_total') ?? m.types.get('process_cpu_user_seconds')).toBe('counter');
    expect(valueOf(m, 'process_resident_memory_bytes')).toBeGreaterThan(0);
    expect(m.types.get('billing_rpc_duration_seconds')).toBe('histogram');
    expect(m.types.get('billing_retries_pending')).toBe('gauge');
  });

  it('a job run that fails is counted as FAILED, and a call refused before any attempt counts no charge', async () => {
    // A directory is no usage file: the run fails, nothing is ingested.
    const notAFile = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-metrics-dir-'));
    try {
      t = await startWithMetrics({ LOG_FILE_PATH: notAFile });
      const failed = (await call(t.jobs, 'processLogs', {})).jobRun!;
      expect(failed.status).toBe(jobPb.JobRunStatus.JOB_RUN_STATUS_FAILED);
      await expectGrpcError(
        call(t.billing, 'createBillingRecord', { userId: 77n, amount: money('1'), description: 'x', requestId: '' }),
        grpc.status.NOT_FOUND,
        'USER_NOT_FOUND',
      );
      const m = await scrape(t.app.metricsPort!);
      expect(seriesOf(m, 'billing_job_run_duration_seconds_count')).toEqual({ 'kind=PROCESS_LOGS,status=FAILED': 1 });
      expect(seriesOf(m, 'billing_rpc_calls_total')).toEqual({ 'code=OK,method=ProcessLogs': 1, 'code=NOT_FOUND,method=CreateBillingRecord': 1 });
      expect(Object.values(seriesOf(m, 'billing_charge_attempts_total')).filter((v) => v !== 0)).toEqual([]);
      expect(Object.values(seriesOf(m, 'billing_usage_entries_total')).filter((v) => v !== 0)).toEqual([]);
    } finally {
      fs.rmSync(notAFile, { recursive: true, force: true });
    }
  });

  it('counts open event watchers and the delivery lag of every event sent; a watch that ends is counted once', async () => {
    t = await startWithMetrics({ EVENT_POLL_MS: '10' });
    const before = await scrape(t.app.metricsPort!);
    expect(valueOf(before, 'billing_event_watchers')).toBe(0);
    expect(valueOf(before, 'billing_event_delivery_lag_seconds_count')).toBe(0);
    const client = new eventPb.EventServiceClient(t.address, t.credentials, t.clientOptions);
    try {
      const w = [new Watch(client), new Watch(client, { types: ['user.deleted'] })];
      await eventually('both watchers are open', () => t!.app.services.events.watchers === 2);
      // Committed a second ago: each send's lag is at least that.
      await append(t.app, [userCreated(1, 1), userCreated(2, 2), userCreated(3, 3)], new Date(Date.now() - 1000));
      await w[0].until(3);
      const open = await scrape(t.app.metricsPort!);
      expect(valueOf(open, 'billing_event_watchers')).toBe(2);
      expect(open.types.get('billing_event_delivery_lag_seconds')).toBe('histogram');
      expect(valueOf(open, 'billing_event_delivery_lag_seconds_count')).toBe(3);
      expect(valueOf(open, 'billing_event_delivery_lag_seconds_bucket', { le: '0.5' })).toBe(0);
      expect(valueOf(open, 'billing_event_delivery_lag_seconds_sum')).toBeGreaterThanOrEqual(3);
      expectWellFormedHistogram(open, 'billing_event_delivery_lag_seconds');
      for (const x of w) x.cancel();
      await eventually('the watchers are released', () => t!.app.services.events.watchers === 0);
      const after = await scrape(t.app.metricsPort!);
      expect(valueOf(after, 'billing_event_watchers')).toBe(0);
      expect(seriesOf(after, 'billing_rpc_calls_total')).toEqual({ 'code=CANCELLED,method=WatchEvents': 2 });
    } finally {
      client.close();
    }
  });

  it('the listener answers GET /metrics only: 404 for other paths, 405 for other methods', async () => {
    t = await startWithMetrics();
    const port = t.app.metricsPort!;
    expect((await httpRequest(port, '/')).status).toBe(404);
    expect((await httpRequest(port, '/metrics/extra')).status).toBe(404);
    expect((await httpRequest(port, '/metrics', 'POST')).status).toBe(405);
    const ok = await httpRequest(port, '/metrics?x=1');
    expect(ok.status).toBe(200);
    expect(ok.contentType).toMatch(/^text\/plain; version=0\.0\.4/);
  });

  it('stopping the app closes the metrics listener', async () => {
    t = await startWithMetrics();
    const port = t.app.metricsPort!;
    await scrape(port);
    await t.stop();
    t = undefined;
    const refused = await new Promise<string>((resolve) => {
      const socket = net.connect(port, '127.0.0.1');
      socket.once('connect', () => (socket.destroy(), resolve('connected')));
      socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
    });
    expect(refused).toBe('ECONNREFUSED');
  });

  it('with METRICS_PORT unset nothing listens but the gRPC server; with it set, one listener more', async () => {
    const idle = listeningServers();
    t = await startTestApp({}, { scheduler: false });
    expect(t.app.metricsPort).toBeNull();
    expect(listeningServers() - idle).toBe(1);
    await t.stop();
    t = await startTestApp({ METRICS_PORT: '0' }, { scheduler: false });
    expect(t.app.metricsPort).toEqual(expect.any(Number));
    expect(listeningServers() - idle).toBe(2);
  });
});

describe('the service process with METRICS_PORT=0', () => {
  let dir: string;
  let db: TestDatabase;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'billing-metrics-proc-'));
    db = await createTestDatabase(dir);
  });
  afterEach(async () => {
    await killServiceProcesses();
    await db.drop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('names the bound metrics port in its ready line and serves the metrics there until SIGTERM', async () => {
    const svc = await startServiceProcess({ GRPC_PORT: '0', METRICS_PORT: '0', ...db.env, INGEST_CRON: 'off' });
    expect(svc.metricsPort).toEqual(expect.any(Number));
    await call(svc.users, 'createUser', { email: 'p@example.com', name: 'P', requestId: '' });
    const m = await scrape(svc.metricsPort!);
    expect(seriesOf(m, 'billing_rpc_calls_total')).toEqual({ 'code=OK,method=CreateUser': 1 });
    svc.child.kill('SIGTERM');
    expect(await svc.exit).toEqual({ code: 0, signal: null });
    svc.close();
  });
});
