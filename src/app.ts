/**
 * Composition root: config -> logger -> orm -> services -> gRPC server ->
 * retry scheduler -> cron. main.ts adds signal handling; tests call startApp
 * directly with port 0, a temporary database and, when they need one, a clock.
 */
import type { Logger } from 'pino';
import { checkExposure, type Config } from './config';
import { openOrm, type Orm } from './db/orm';
import { createBillingService } from './billing/billing.service';
import type { BillingService } from './billing/billing.types';
import { loadTokensFile, tokensFileWarning } from './grpc/auth';
import { createGrpcServer, serverCredentials, type GrpcServer } from './grpc/server';
import { createCron, type Cron } from './jobs/cron';
import { createJobsService } from './jobs/jobs.service';
import type { JobsService } from './jobs/jobs.types';
import { createRetryScheduler, type RetryScheduler } from './jobs/retry-scheduler';
import { systemClock, type Clock } from './shared/clock';
import { createLogger } from './shared/logger';
import { createIngestService } from './usage/ingest.service';
import { createUsersService, type UsersService } from './users/users.service';
import { createWalletsService, type WalletsService } from './wallets/wallets.service';

export interface Services {
  users: UsersService;
  wallets: WalletsService;
  billing: BillingService;
  jobs: JobsService;
}

export interface App {
  config: Readonly<Config>;
  log: Logger;
  orm: Orm;
  services: Services;
  grpc: GrpcServer;
  scheduler: RetryScheduler;
  cron: Cron | null;
  /** The port the gRPC server listens on (useful with GRPC_PORT=0). */
  port: number;
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
  const orm = await openOrm(config.database, log);
  try {
    let scheduler: RetryScheduler | undefined;
    const billing = createBillingService({
      clock,
      log,
      pricing: config.pricing,
      retryBaseDelayMs: config.retryBaseDelayMs,
      maxRetries: config.maxRetries,
      onRetryScheduled: (at) => scheduler?.wake(at),
    });
    const users = createUsersService({ clock });
    const wallets = createWalletsService({
      clock,
      log,
      settle: (em, userId) => billing.settleUser(em, userId),
      onSettleFailed: () => scheduler?.requestSweep(),
    });
    const ingest = createIngestService({
      clock,
      log,
      pricing: config.pricing,
      logFilePath: config.logFilePath,
      readTimeoutMs: config.usageReadTimeoutMs,
      maxFutureSkewMs: config.maxFutureSkewMs,
      billing,
    });
    const jobs = createJobsService({ em: orm.em, clock, log, ingest, billing, leaseMs: opts.jobLeaseMs });
    scheduler = createRetryScheduler({ em: orm.em, clock, log, billing, jobs, pollMs: opts.schedulerPollMs });
    const services: Services = { users, wallets, billing, jobs };

    const grpc = createGrpcServer({
      em: orm.em,
      services,
      log,
      currency: config.currency,
      tokens,
      limits: config.limits,
      credentials,
      accessLog: config.accessLog,
    });
    const port = await grpc.bind(config.grpcHost, config.grpcPort);
    // SQLite belongs to this one process: a run still RUNNING was cut off by a previous stop.
    if (config.database.kind === 'sqlite') await jobs.closeInterruptedRuns();
    // Any replica closes runs whose process stopped renewing their lease (died, or lost the database for good).
    jobs.startReaper();
    if (opts.scheduler !== false) await scheduler.start();
    const cron = config.ingestCron ? createCron({ expression: config.ingestCron, jobs, log }) : null;
    cron?.start();
    grpc.setServing(true);
    for (const warning of warnings) log.warn({ security: true }, warning);
    if (tokensFileMode) log.warn({ security: true, mode: tokensFileMode.mode }, tokensFileMode.message);
    const auth = tokens ? `tokens (${tokens.names.length})` : 'off';
    const transport = config.tls === null ? 'plaintext' : config.tls.clientCaFile === null ? 'tls' : 'mtls';
    log.info({ host: config.grpcHost, port, database: config.database.kind, auth, transport }, 'billing-service ready');

    let stopping: Promise<void> | undefined;
    const stop = () =>
      (stopping ??= (async () => {
        grpc.setServing(false);
        cron?.stop();
        await grpc.shutdown(config.shutdownGraceMs);
        await scheduler!.stop();
        await cron?.idle();
        await jobs.stopReaper();
        await orm.close();
        log.info('billing-service stopped');
      })());
    return { config, log, orm, services, grpc, scheduler, cron, port, stop };
  } catch (err) {
    await orm.close(true).catch(() => undefined);
    throw err;
  }
}
