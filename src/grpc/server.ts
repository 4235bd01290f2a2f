/**
 * The gRPC server: the billing services, gRPC health (NOT_SERVING until
 * the app says otherwise, and again from the start of shutdown) and server
 * reflection fed from the real descriptor set that `buf build` wrote, plus
 * health, reflection and google.rpc.ErrorInfo (./reflection.ts).
 * Optionally bearer-token authentication (./auth.ts), TLS or mutual TLS, and
 * the transport limits from the config: per call and stream (./streams.ts, the
 * first interceptor) and per connection (./listener.ts owns the listening
 * sockets, to cap their number).
 */
import { setMaxListeners } from 'node:events';
import * as fs from 'node:fs';
import * as tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import type { EntityManager } from '@mikro-orm/knex';
import { HealthImplementation, type ServingStatusMap } from 'grpc-health-check';
import type { Logger } from 'pino';
import type { BillingService } from '../billing/billing.service';
import type { EventsService } from '../events/events.service';
import type { JobsService } from '../jobs/jobs.types';
import type { UsageService } from '../usage/usage.service';
import type { UsersService } from '../users/users.service';
import type { WalletsService } from '../wallets/wallets.service';
import type { Metrics } from '../shared/metrics';
import { ConfigError, DEFAULT_GRPC_LIMITS, type GrpcLimits, type TlsConfig } from '../config';
import * as billingPb from '../../generated/billing/v1/billing_service';
import * as eventPb from '../../generated/billing/v1/event_service';
import * as jobPb from '../../generated/billing/v1/job_service';
import * as usagePb from '../../generated/billing/v1/usage_service';
import * as userPb from '../../generated/billing/v1/user_service';
import * as walletPb from '../../generated/billing/v1/wallet_service';
import { createBidi, createServerStream, createUnary } from './adapter';
import { createAuthInterceptor, type Caller, type TokenTable } from './auth';
import { installGrpcLogger } from './grpc-log';
import { listen, type Listener } from './listener';
import { DESCRIPTOR_SET_PATH, reflectionDefinition } from './reflection';
import { createStreamGuard } from './streams';
import { createBillingHandlers } from './billing.handlers';
import { createEventHandlers } from './event.handlers';
import { createJobHandlers } from './job.handlers';
import { createUsageHandlers } from './usage.handlers';
import { createUserHandlers } from './user.handlers';
import { createWalletHandlers } from './wallet.handlers';

export interface GrpcServer {
  /** Listens on host:port (port 0 picks a free one) and resolves with the bound port. */
  bind(host: string, port: number): Promise<number>;
  /** Health: SERVING for '' and every billing service, or NOT_SERVING. */
  setServing(serving: boolean): void;
  /** NOT_SERVING, then drains calls for up to graceMs and cuts off whatever is left. */
  shutdown(graceMs: number): Promise<void>;
}

/** The services the RPCs call (built by the composition root, ../app.ts). */
export interface Services {
  users: UsersService;
  wallets: WalletsService;
  billing: BillingService;
  usage: UsageService;
  jobs: JobsService;
  events: EventsService;
}

export interface GrpcServerDeps {
  /** The root entity manager; the adapter forks it once per call. */
  /** A new unit of work for each call. */
  fork: () => EntityManager;
  services: Services;
  log: Logger;
  /** The deployment's currency (ISO 4217). */
  currency: string;
  /** Bearer tokens; absent or null: authentication off, every call is admitted. */
  tokens?: TokenTable | null;
  /** Transport limits (default DEFAULT_GRPC_LIMITS). */
  limits?: Readonly<GrpcLimits>;
  /** How bind() listens (default plaintext); see serverCredentials(). */
  credentials?: grpc.ServerCredentials;
  /** ACCESS_LOG: one info line for every call (default false; see ./rpc-log.ts). */
  accessLog?: boolean;
  /** Where every unary call of the billing services is counted, refused ones too (default: nowhere). */
  metrics?: Metrics;
}

/** The grpc-js options for the limits (only options the grpc-js server honours). */
export function serverOptions(limits: Readonly<GrpcLimits>): grpc.ServerOptions {
  return {
    'grpc.max_receive_message_length': limits.maxReceiveMessageBytes,
    'grpc.max_send_message_length': limits.maxSendMessageBytes,
    'grpc.max_concurrent_streams': limits.maxConcurrentStreams,
    'grpc.max_connection_idle_ms': limits.maxConnectionIdleMs,
    'grpc.keepalive_time_ms': limits.keepaliveTimeMs,
    'grpc.keepalive_timeout_ms': limits.keepaliveTimeoutMs,
    'grpc.max_connection_age_ms': limits.maxConnectionAgeMs,
    'grpc.max_connection_age_grace_ms': limits.maxConnectionAgeGraceMs,
    // No channelz service is exposed, so its per-call bookkeeping is only cost.
    'grpc.enable_channelz': 0,
  };
}

function readPem(variable: string, file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new ConfigError(`${variable}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? 'unreadable'})`);
  }
}

/**
 * Plaintext without TLS settings; TLS with a certificate and key; mutual TLS
 * (client certificates required and verified against the CA) when a client
 * CA is set too. The files are read and checked now, so a wrong or mismatched
 * file stops start-up with a ConfigError instead of failing at bind.
 */
export function serverCredentials(config: Readonly<TlsConfig> | null): grpc.ServerCredentials {
  if (config === null) return grpc.ServerCredentials.createInsecure();
  const cert = readPem('TLS_CERT_FILE', config.certFile);
  const key = readPem('TLS_KEY_FILE', config.keyFile);
  const ca = config.clientCaFile === null ? null : readPem('TLS_CLIENT_CA_FILE', config.clientCaFile);
  try {
    tls.createSecureContext({ cert, key });
  } catch (e) {
    throw new ConfigError(
      `TLS_CERT_FILE/TLS_KEY_FILE: not a PEM certificate and its matching private key (${(e as Error).message})`,
    );
  }
  if (ca !== null) {
    try {
      tls.createSecureContext({ ca });
    } catch (e) {
      throw new ConfigError(`TLS_CLIENT_CA_FILE: not a PEM CA certificate (${(e as Error).message})`);
    }
    if (!ca.toString('latin1').includes('-----BEGIN CERTIFICATE-----')) {
      throw new ConfigError('TLS_CLIENT_CA_FILE: no PEM certificate in the file');
    }
  }
  return grpc.ServerCredentials.createSsl(ca, [{ cert_chain: cert, private_key: key }], ca !== null);
}

/** The fully-qualified names health reports on, besides the overall ''. */
export const SERVICE_NAMES: readonly string[] = [
  userPb.UserServiceClient.serviceName,
  walletPb.WalletServiceClient.serviceName,
  billingPb.BillingServiceClient.serviceName,
  jobPb.JobServiceClient.serviceName,
  usagePb.UsageServiceClient.serviceName,
  eventPb.EventServiceClient.serviceName,
];

export function createGrpcServer(deps: GrpcServerDeps): GrpcServer {
  const { fork, services, log, currency, accessLog = false, metrics } = deps;
  // grpc-js's own messages (which can quote request headers) go to pino, redacted, from now on.
  installGrpcLogger(log);
  const credentials = deps.credentials ?? grpc.ServerCredentials.createInsecure();
  // Who made each admitted call, for the adapter's log line; entries go with the call's metadata.
  const callers = new WeakMap<grpc.Metadata, Caller>();
  const limits = deps.limits ?? DEFAULT_GRPC_LIMITS;
  // The stream guard must come first: only the first interceptor is handed grpc-js's own call object (./streams.ts).
  const interceptors = [
    createStreamGuard({
      log,
      maxOpenCallsPerConnection: limits.maxOpenCallsPerConnection,
      maxReceiveMessageBytes: limits.maxReceiveMessageBytes,
    }),
    ...(deps.tokens ? [createAuthInterceptor({ tokens: deps.tokens, log, callers, accessLog, metrics })] : []),
  ];
  const server = new grpc.Server({ ...serverOptions(limits), interceptors });
  const adapterDeps = { fork, log, callerOf: (metadata: grpc.Metadata) => callers.get(metadata)?.name, accessLog, metrics };
  const unary = createUnary(adapterDeps);
  const bidi = createBidi(adapterDeps);
  // Aborted as shutdown starts: server streams (WatchEvents) end then, instead of holding the drain.
  const closing = new AbortController();
  // One listener per open stream (a thousand watchers are a thousand): not a leak, so no warning.
  setMaxListeners(0, closing.signal);
  const serverStream = createServerStream({ ...adapterDeps, closing: closing.signal });

  server.addService(userPb.UserServiceService, createUserHandlers({ unary, users: services.users }));
  server.addService(walletPb.WalletServiceService, createWalletHandlers({ unary, wallets: services.wallets, currency }));
  server.addService(
    billingPb.BillingServiceService,
    createBillingHandlers({ unary, billing: services.billing, usage: services.usage, currency }),
  );
  server.addService(jobPb.JobServiceService, createJobHandlers({ unary, jobs: services.jobs }));
  server.addService(usagePb.UsageServiceService, createUsageHandlers({ unary, bidi, usage: services.usage, currency }));
  server.addService(eventPb.EventServiceService, createEventHandlers({ unary, serverStream, events: services.events, currency }));

  const allNames = ['', ...SERVICE_NAMES];
  const initial: ServingStatusMap = Object.fromEntries(allNames.map((name) => [name, 'NOT_SERVING']));
  const health = new HealthImplementation(initial);
  health.addToServer(server);

  // Reflection is fed from the descriptor set buf built, not from .proto text
  // (a definition loaded from text breaks method calls in `buf curl`,
  // grpc/grpc-node#3018).
  new ReflectionService(reflectionDefinition(fs.readFileSync(DESCRIPTOR_SET_PATH))).addToServer(server);

  let shuttingDown = false;
  let stopped: Promise<void> | undefined;
  let listener: Listener | undefined;
  const setAll = (status: 'SERVING' | 'NOT_SERVING') => {
    for (const name of allNames) health.setStatus(name, status);
  };

  return {
    async bind(host, port) {
      if (listener) throw new Error('the gRPC server is bound already');
      const injector = server.createConnectionInjector(credentials);
      listener = await listen({ host, port, maxConnections: limits.maxConnections, injector, log });
      return listener.port;
    },

    setServing(serving) {
      setAll(serving && !shuttingDown ? 'SERVING' : 'NOT_SERVING');
    },

    shutdown(graceMs) {
      shuttingDown = true;
      setAll('NOT_SERVING');
      listener?.close();
      closing.abort();
      stopped ??= new Promise<void>((resolve) => {
        let finished = false;
        const done = () => {
          if (finished) return;
          finished = true;
          clearTimeout(force);
          // Connections that never became HTTP/2 sessions (a TLS handshake in progress) are not grpc-js's to close.
          listener?.destroyAll();
          resolve();
        };
        const force = setTimeout(() => {
          log.warn({ graceMs }, 'calls still running after the grace period; closing them');
          server.forceShutdown();
          done();
        }, graceMs);
        // grpc-js calls back once its HTTP/2 sessions have closed, but on Node 24 at once, calls still open: there
        // the HTTP/2 server's own close() already closes every session (nodejs/node#57586), and grpc-js 1.14 takes a
        // session that is closing for one that is closed. A session's connection closes once its last call has
        // ended, so the drain also waits for every connection to close, or the grace period to run out (which a
        // connection still in its TLS handshake, not a session yet, now waits for too).
        const sessionsClosed = new Promise<void>((closed) =>
          server.tryShutdown((err) => {
            if (err) log.warn({ err }, 'graceful gRPC shutdown reported an error');
            closed();
          }),
        );
        void Promise.all([sessionsClosed, listener?.allClosed()]).then(done);
      });
      return stopped;
    },
  };
}
