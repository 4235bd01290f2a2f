/**
 * Composition root: config -> logger -> the database object -> repositories
 * (one door per table) -> metrics (when METRICS_PORT is set) -> services ->
 * metrics listener -> gRPC server -> retry scheduler -> cron.
 * main.ts adds signal handling; tests call startApp directly with port 0, a
 * temporary database and, when they need one, a clock.
 */
import type { Logger } from 'pino';
import { createBillingService } from './billing/billing.service';
import { createCharging } from './billing/charging';
import { checkExposure, ConfigError, sqliteInMemory, type Config } from './config';
import { openDatabase, type Database } from './db/database';
import { createEventsService } from './events/events.service';
import { createIdempotencyKeys } from './db/idempotency';
import { openDoors } from './doors';
import { loadTokensFile, tokensFileWarning } from './grpc/auth';
import { createGrpcServer, serverCredentials, type GrpcServer, type Services } from './grpc/server';
import { createCron, type Cron } from './jobs/cron';
import { createJobsService } from './jobs/jobs.service';
import { createRetryScheduler, type RetryScheduler } from './jobs/retry-scheduler';
import { createPrometheusMetrics } from './ops/metrics';
import { startMetricsServer, type MetricsServer } from './ops/metrics-server';
import { systemClock, type Clock } from './shared/clock';
import { createLogger } from './shared/logger';
import { noMetrics } from './shared/metrics';
import { createIngestService } from './usage/ingest';
import { createUsageService } from './usage/usage.service';
import { startUsageWriter, usageWriterScript, type UsageWriter } from './usage/usage-writer';
import { createUsersService } from './users/users.service';
import { createWalletsService } from './wallets/wallets.service';

export interface App {
  config: Readonly<Config>;
  log: Logger;
  /** The database object: the ORM, the connections and the dialect. */
  db: Database;
  services: Services;
  grpc: GrpcServer;
  scheduler: RetryScheduler;
  cron: Cron | null;
  /** The port the gRPC server listens on (useful with GRPC_PORT=0). */
  port: number;
  /** The port the metrics listener is on (useful with METRICS_PORT=0), or null when metrics are off. */
  metricsPort: number | null;
  /** Graceful stop: NOT_SERVING, drain calls (bounded), stop jobs, close the database. */
  stop(): Promise<void>;
}

export interface AppOptions {
  clock?: Clock;
  log?: Logger;
  /** Start the real-time retry scheduler (default true). */
  scheduler?: boolean;
  /** The scheduler's longest sleep between looks at the database, and its sweep interval (default 30 s). */
  schedulerPollMs?: number;
  /** A RUNNING job run's lease (default 60 s; see JobsDeps.leaseMs). */
  jobLeaseMs?: number;
  /** The usage writer thread's compiled script (default: the one beside the compiled service; tests running the sources give dist's). */
  usageWriterScript?: string;
}

/** The usage writer thread's shared lock-waiter counter, for the database objects of both threads. */
const newLockWaiters = () => new Int32Array(new SharedArrayBuffer(4));

/** Whether batches of usage are written on the usage writer thread (see usage/usage-writer.ts). */
function writesUsageOnThread(config: Readonly<Config>, opts: AppOptions): boolean {
  const db = config.database;
  // The thread keeps the system clock: a test's own clock stays with the event loop's writes.
  return config.usageWriter === 'thread' && db.kind === 'sqlite' && !sqliteInMemory(db.path) && opts.clock === undefined;
}

export async function startApp(config: Readonly<Config>, opts: AppOptions = {}): Promise<App> {
  const clock = opts.clock ?? systemClock;
  const log = opts.log ?? createLogger(config.logLevel);
  // Security settings first: a refused exposure or a bad token or TLS file
  // is a ConfigError before anything is opened.
  const warnings = checkExposure(config);
  const tokens = config.authTokensFile ? loadTokensFile(config.authTokensFile) : null;
  const tokensFileMode = config.authTokensFile ? tokensFileWarning(config.authTokensFile) : null;
  const credentials = serverCredentials(config.tls);
  const onThread = writesUsageOnThread(config, opts);
  const script = onThread ? (opts.usageWriterScript ?? usageWriterScript()) : null;
  if (onThread && script === null) {
    throw new ConfigError('USAGE_WRITER=thread needs the compiled service (npm run build) for its worker script; or set USAGE_WRITER=inline');
  }
  const lockWaiters = onThread ? newLockWaiters() : undefined;
  const db = await openDatabase(config.database, log, { lockWaiters });
  let metricsServer: MetricsServer | null = null;
  let usageWriter: UsageWriter | null = null;
  try {
    // The doors: every table has one owner, and every write goes through its named methods.
    const idempotency = createIdempotencyKeys();
    const { events, userRows, ledger, records, usageLogs, jobRuns, alertRows, alerts } = openDoors(db, clock, config);
    // One registry per app, built only when metrics are on; otherwise every report goes nowhere.
    const prometheus = config.metrics ? createPrometheusMetrics({ log, countPendingRetries: () => records.countPendingRetries() }) : null;
    const metrics = prometheus ?? noMetrics;

    let scheduler: RetryScheduler | undefined;
    const charging = createCharging({
      db,
      clock,
      log,
      policy: { retryBaseDelayMs: config.retryBaseDelayMs, maxRetries: config.maxRetries },
      records,
      ledger,
      users: userRows,
      onRetryScheduled: (at) => scheduler?.wake(at),
      metrics,
    });
    const billing = createBillingService({ db, clock, log, records, ledger, users: userRows, charging, idempotency, alerts });
    const users = createUsersService({ db, clock, users: userRows, ledger, records, usageLogs, idempotency, pricing: config.pricing, alerts: alertRows });
    const wallets = createWalletsService({
      db,
      clock,
      log,
      ledger,
      users: userRows,
      records,
      usageLogs,
      idempotency,
      pricing: config.pricing,
      alerts,
      settle: (userId) => billing.settleUser(userId),
      onSettleFailed: () => scheduler?.requestSweep(),
    });
    // After the migrations (the thread opens the same file without migrating).
    usageWriter = script
      ? await startUsageWriter(
          script,
          {
            database: config.database,
            logLevel: config.logLevel,
            pricing: config.pricing,
            lowBalanceThreshold: config.lowBalanceThreshold,
            maxFutureSkewMs: config.maxFutureSkewMs,
            logFilePath: config.logFilePath,
            readTimeoutMs: config.usageReadTimeoutMs,
            lockWaiters: lockWaiters!,
          },
          log,
        )
      : null;
    const ingest = createIngestService({
      db,
      clock,
      log,
      pricing: config.pricing,
      logFilePath: config.logFilePath,
      readTimeoutMs: config.usageReadTimeoutMs,
      maxFutureSkewMs: config.maxFutureSkewMs,
      usageLogs,
      records,
      ledger,
      billing,
      alerts,
      metrics,
      runner: usageWriter ?? undefined,
    });
    const usage = createUsageService({
      recorder: usageWriter ?? undefined,
      db,
      clock,
      pricing: config.pricing,
      maxFutureSkewMs: config.maxFutureSkewMs,
      batchMax: config.usageBatchMax,
      usageLogs,
      ledger,
      metrics,
      alerts,
    });
    const jobs = createJobsService({ db, clock, log, jobRuns, ingest, billing, leaseMs: opts.jobLeaseMs, metrics });
    scheduler = createRetryScheduler({ db, clock, log, billing, jobs, pollMs: opts.schedulerPollMs });
    const eventStream = createEventsService({
      events,
      clock,
      log,
      metrics,
      retentionMs: config.events.retentionMs,
      pollMs: config.events.pollMs,
      watchBuffer: config.events.watchBuffer,
    });
    const services: Services = { users, wallets, billing, usage, jobs, events: eventStream };

    const grpc = createGrpcServer({
      fork: () => db.fork(),
      services,
      log,
      currency: config.currency,
      tokens,
      limits: config.limits,
      credentials,
      accessLog: config.accessLog,
      metrics,
    });
    if (config.metrics && prometheus) {
      metricsServer = await startMetricsServer({ host: config.metrics.host, port: config.metrics.port, registry: prometheus.registry, log });
      log.info({ host: config.metrics.host, metricsPort: metricsServer.port }, 'metrics listening');
    }
    const metricsPort = metricsServer?.port ?? null;
    const port = await grpc.bind(config.grpcHost, config.grpcPort);
    // SQLite belongs to this one process: a run still RUNNING was cut off by a previous stop.
    if (db.dialect === 'sqlite') await jobs.closeInterruptedRuns();
    // Any replica closes runs whose process stopped renewing their lease (died, or lost the database for good).
    jobs.startReaper();
    // Every replica prunes (at once, then every 10 minutes); the retention mark only moves forward.
    eventStream.start();
    if (opts.scheduler !== false) await scheduler.start();
    const cron = config.ingestCron ? createCron({ expression: config.ingestCron, jobs, log }) : null;
    cron?.start();
    grpc.setServing(true);
    for (const warning of warnings) log.warn({ security: true }, warning);
    if (tokensFileMode) log.warn({ security: true, mode: tokensFileMode.mode }, tokensFileMode.message);
    const auth = tokens ? `tokens (${tokens.names.length})` : 'off';
    const transport = config.tls === null ? 'plaintext' : config.tls.clientCaFile === null ? 'tls' : 'mtls';
    log.info(
      { host: config.grpcHost, port, database: db.dialect, auth, transport, ...(metricsPort === null ? {} : { metricsPort }) },
      'billing-service ready',
    );

    let stopping: Promise<void> | undefined;
    const stop = () =>
      (stopping ??= (async () => {
        grpc.setServing(false);
        cron?.stop();
        await grpc.shutdown(config.shutdownGraceMs);
        await usageWriter?.close();
        await eventStream.stop();
        await scheduler!.stop();
        await cron?.idle();
        await jobs.stopReaper();
        // After the last job (its counts are in), before the database goes (the pending-retries gauge reads it).
        await metricsServer?.close();
        await db.close();
        log.info('billing-service stopped');
      })());
    return { config, log, db, services, grpc, scheduler, cron, port, metricsPort, stop };
  } catch (err) {
    await metricsServer?.close();
    await usageWriter?.close().catch(() => undefined);
    await db.close(true).catch(() => undefined);
    throw err;
  }
}
