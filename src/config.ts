/**
 * The only reader of process.env. Every setting is validated here; an invalid
 * value stops start-up with a message naming the variable.
 */
import { isIPv4, isIPv6 } from 'node:net';
import { CronTime } from 'cron';
import { DecimalError, MONEY_SCALE, parseDecimal } from './shared/money';

export type DatabaseConfig =
  | { kind: 'sqlite'; path: string }
  | { kind: 'postgresql'; url: string };

/** An in-memory SQLite database (one connection, gone with it) rather than a file. */
export const sqliteInMemory = (path: string): boolean => path === ':memory:' || path === '';

export interface Config {
  grpcHost: string;
  grpcPort: number;
  database: DatabaseConfig;
  logLevel: string;
  /** Access log: one info line for every RPC; off, only money-moving calls and server faults get one (./grpc/rpc-log.ts). */
  accessLog: boolean;
  currency: string;
  logFilePath: string;
  /** Longest that opening the usage file, or any one read of it, may take before the run fails (ms). */
  usageReadTimeoutMs: number;
  /** Most events in one RecordUsage / StreamUsage batch. */
  usageBatchMax: number;
  /**
   * USAGE_WRITER: `thread` (default) writes RecordUsage / StreamUsage batches on a worker thread with a SQLite
   * connection of its own (usage/usage-writer.ts); `inline` on the event loop. PostgreSQL and in-memory SQLite
   * are always inline.
   */
  usageWriter: 'thread' | 'inline';
  /**
   * LOW_BALANCE_THRESHOLD: the deployment's low-balance threshold in micros (0: no balance.low events, while
   * balance.depleted and balance.recovered still are); a user's own threshold (SetBalanceAlert) replaces it.
   */
  lowBalanceThreshold: bigint;
  /** service -> price of one unit, in micros. */
  pricing: ReadonlyMap<string, bigint>;
  retryBaseDelayMs: number;
  maxRetries: number;
  /** Cron expression (UTC) for ProcessAll, or null when disabled with "off". */
  ingestCron: string | null;
  /** How far in the future a usage timestamp may be (clock skew), in ms. */
  maxFutureSkewMs: number;
  /** How long SIGTERM waits for in-flight calls before forcing them closed. */
  shutdownGraceMs: number;
  /** JSON list of bearer tokens ({name, token, role}); null turns authentication off. */
  authTokensFile: string | null;
  /** Server certificate and key (PEM files), and for mutual TLS the CA client certificates must chain to. */
  tls: TlsConfig | null;
  /** Allows listening on a non-loopback address with authentication off. */
  allowInsecure: boolean;
  /** Transport limits of the gRPC server. */
  limits: GrpcLimits;
  /** The Prometheus listener (METRICS_PORT), or null when metrics are off (the default). */
  metrics: MetricsConfig | null;
  /** The event stream (EventService). */
  events: EventsConfig;
}

export interface EventsConfig {
  /** EVENT_RETENTION: events older than this are deleted (ms; default 30 days). */
  retentionMs: number;
  /** EVENT_POLL_MS: how often a replica with watchers looks for new events. */
  pollMs: number;
  /** EVENT_WATCH_BUFFER: most events one WatchEvents stream may have waiting; more ends it (CONSUMER_TOO_SLOW). */
  watchBuffer: number;
}

export const DEFAULT_EVENTS_CONFIG: Readonly<EventsConfig> = Object.freeze({
  retentionMs: 30 * 86_400_000,
  pollMs: 25,
  watchBuffer: 10_000,
});

export interface MetricsConfig {
  /** METRICS_HOST, loopback by default. */
  host: string;
  /** METRICS_PORT; 0 picks a free port (the ready line names it). */
  port: number;
  /** METRICS_ALLOW_REMOTE: a non-loopback METRICS_HOST is allowed (the listener has no authentication). */
  allowRemote: boolean;
}

export interface TlsConfig {
  certFile: string;
  keyFile: string;
  /** Set: mutual TLS, every client must present a certificate issued by this CA. */
  clientCaFile: string | null;
}

export interface GrpcLimits {
  /** Largest request message accepted; a bigger one is RESOURCE_EXHAUSTED. */
  maxReceiveMessageBytes: number;
  /** Largest response message sent; a bigger one fails the call with RESOURCE_EXHAUSTED. */
  maxSendMessageBytes: number;
  /** Concurrent calls (HTTP/2 streams) per connection. */
  maxConcurrentStreams: number;
  /** Open connections, counting ones still in their TLS or HTTP/2 handshake; more are closed at once. */
  maxConnections: number;
  /** A connection with no call for this long is closed (also one that never completes its HTTP/2 preface). */
  maxConnectionIdleMs: number;
  /** Health and reflection calls (open to clients without a token) one connection may have running at once. */
  maxOpenCallsPerConnection: number;
  /** Idle time after which the server pings a connection, and how long it waits for the answer. */
  keepaliveTimeMs: number;
  keepaliveTimeoutMs: number;
  /** Connections are closed gracefully after this age (so clients rebalance), calls get the grace to finish. */
  maxConnectionAgeMs: number;
  maxConnectionAgeGraceMs: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_GRPC_LIMITS: Readonly<GrpcLimits> = Object.freeze({
  maxReceiveMessageBytes: 1 * MiB,
  maxSendMessageBytes: 4 * MiB,
  maxConcurrentStreams: 1000,
  maxConnections: 500,
  maxConnectionIdleMs: 5 * 60 * 1000,
  maxOpenCallsPerConnection: 8,
  keepaliveTimeMs: 2 * 60 * 60 * 1000,
  keepaliveTimeoutMs: 20_000,
  maxConnectionAgeMs: 30 * 60 * 1000,
  maxConnectionAgeGraceMs: 30_000,
});

export const DEFAULT_PRICING: Record<string, string> = {
  'api-calls': '0.01',
  storage: '0.05',
  bandwidth: '0.02',
  compute: '0.10',
};

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

type Env = Record<string, string | undefined>;

function int(env: Env, name: string, def: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return def;
  if (!/^\d+$/.test(raw.trim())) throw new ConfigError(`${name} must be a whole number, got ${JSON.stringify(raw)}`);
  const value = Number(raw.trim());
  if (value < min || value > max) throw new ConfigError(`${name} must be between ${min} and ${max}, got ${value}`);
  return value;
}

/** A money setting: a decimal amount in the deployment's currency, not negative, in whole micros; in micros. */
function money(env: Env, name: string, fallback: string): bigint {
  const raw = env[name]?.trim() || fallback;
  try {
    return parseDecimal(raw, MONEY_SCALE);
  } catch (e) {
    const why = e instanceof DecimalError ? e.message : String(e);
    throw new ConfigError(`${name} must be an amount like "10.00" (not negative, whole micros), got ${JSON.stringify(env[name])}: ${why}`);
  }
}

export function parsePricing(text: string, name = 'PRICING'): Map<string, bigint> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ConfigError(`${name} must be a JSON object of service -> price, e.g. {"api-calls":"0.01"}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new ConfigError(`${name} must be a JSON object of service -> price`);
  }
  const pricing = new Map<string, bigint>();
  for (const [service, price] of Object.entries(parsed)) {
    if (service.trim() === '' || service.trim() !== service) {
      throw new ConfigError(`${name}: service names must be non-empty without surrounding spaces`);
    }
    if (typeof price !== 'string') {
      throw new ConfigError(`${name}: the price of ${service} must be a decimal string like "0.01" (not a JSON number)`);
    }
    try {
      pricing.set(service, parseDecimal(price, MONEY_SCALE));
    } catch (e) {
      const why = e instanceof DecimalError ? e.message : String(e);
      throw new ConfigError(`${name}: the price of ${service} is invalid: ${why} (whole micros, not negative)`);
    }
  }
  return pricing;
}

/** A path setting: unset or blank is null. */
function filePath(env: Env, name: string): string | null {
  const raw = env[name]?.trim();
  return raw ? raw : null;
}

function usageWriter(env: Env): Config['usageWriter'] {
  const raw = env.USAGE_WRITER?.trim().toLowerCase() || 'thread';
  if (raw !== 'thread' && raw !== 'inline') throw new ConfigError(`USAGE_WRITER must be thread or inline, got ${JSON.stringify(env.USAGE_WRITER)}`);
  return raw;
}

function bool(env: Env, name: string, def: boolean): boolean {
  const raw = env[name]?.trim().toLowerCase();
  if (raw === undefined || raw === '') return def;
  if (raw === 'true') return true;
  if (raw === 'false') return false;
  throw new ConfigError(`${name} must be true or false, got ${JSON.stringify(env[name])}`);
}

function tls(env: Env): TlsConfig | null {
  const certFile = filePath(env, 'TLS_CERT_FILE');
  const keyFile = filePath(env, 'TLS_KEY_FILE');
  const clientCaFile = filePath(env, 'TLS_CLIENT_CA_FILE');
  if ((certFile === null) !== (keyFile === null)) {
    throw new ConfigError('TLS_CERT_FILE and TLS_KEY_FILE must be set together (both or neither)');
  }
  if (certFile === null || keyFile === null) {
    if (clientCaFile !== null) throw new ConfigError('TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE');
    return null;
  }
  return Object.freeze({ certFile, keyFile, clientCaFile });
}

function limits(env: Env): GrpcLimits {
  const d = DEFAULT_GRPC_LIMITS;
  return {
    maxReceiveMessageBytes: int(env, 'MAX_RECEIVE_MESSAGE_BYTES', d.maxReceiveMessageBytes, 1024, 64 * MiB),
    // Reflection answers with the whole descriptor set (about 42 KiB), so sending needs at least 64 KiB.
    maxSendMessageBytes: int(env, 'MAX_SEND_MESSAGE_BYTES', d.maxSendMessageBytes, 64 * 1024, 64 * MiB),
    maxConcurrentStreams: int(env, 'MAX_CONCURRENT_STREAMS', d.maxConcurrentStreams, 1, 100_000),
    maxConnections: int(env, 'MAX_CONNECTIONS', d.maxConnections, 1, 100_000),
    maxConnectionIdleMs: int(env, 'MAX_CONNECTION_IDLE_MS', d.maxConnectionIdleMs, 1000, 7 * 86_400_000),
    maxOpenCallsPerConnection: int(env, 'MAX_OPEN_CALLS_PER_CONNECTION', d.maxOpenCallsPerConnection, 1, 1000),
    keepaliveTimeMs: int(env, 'KEEPALIVE_TIME_MS', d.keepaliveTimeMs, 10_000, 86_400_000),
    keepaliveTimeoutMs: int(env, 'KEEPALIVE_TIMEOUT_MS', d.keepaliveTimeoutMs, 1000, 600_000),
    // Node timers cap at 2^31-1 ms (about 24.8 days); 7 days is plenty.
    maxConnectionAgeMs: int(env, 'MAX_CONNECTION_AGE_MS', d.maxConnectionAgeMs, 1000, 7 * 86_400_000),
    maxConnectionAgeGraceMs: int(env, 'MAX_CONNECTION_AGE_GRACE_MS', d.maxConnectionAgeGraceMs, 0, 3_600_000),
  };
}

/** 127.0.0.0/8, ::1 (in any spelling, also as ::ffff:127.x.y.z) and localhost: only this machine can connect. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1');
  if (h === 'localhost' || h === 'localhost.') return true;
  if (isIPv4(h)) return h.startsWith('127.');
  if (!isIPv6(h) || h.includes('%')) return false; // a zone id means a link-local address
  // The WHATWG URL parser writes IPv6 in one canonical form: compressed, with a mapped IPv4 in hex.
  const canonical = new URL(`http://[${h}]/`).hostname.slice(1, -1);
  return canonical === '::1' || /^::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}$/.test(canonical);
}

/**
 * Secure by default. Listening where other machines can connect with
 * authentication off is refused unless ALLOW_INSECURE=true. Returns the
 * warnings to log at start-up (empty for a safe setup).
 */
export function checkExposure(config: Readonly<Config>): string[] {
  return [...checkGrpcExposure(config), ...checkMetricsExposure(config)];
}

/**
 * The metrics listener has neither authentication nor TLS, so a non-loopback
 * METRICS_HOST needs METRICS_ALLOW_REMOTE=true (its own switch: allowing remote
 * scrapes must not also allow an unauthenticated gRPC port, ALLOW_INSECURE's job).
 */
function checkMetricsExposure(config: Readonly<Config>): string[] {
  const { metrics } = config;
  if (metrics === null || isLoopbackHost(metrics.host)) return [];
  const where = `METRICS_HOST=${metrics.host} is not a loopback address`;
  if (!metrics.allowRemote) {
    throw new ConfigError(
      `${where}: the metrics listener has no authentication or TLS, so anyone who can reach the port could read ` +
        'the metrics. Listen on 127.0.0.1 (and scrape through a local agent or a sidecar), ' +
        'or set METRICS_ALLOW_REMOTE=true when a firewall or network policy limits who can connect',
    );
  }
  return [`${where}: metrics are served without authentication to whoever can reach port ${metrics.port} (METRICS_ALLOW_REMOTE=true)`];
}

function checkGrpcExposure(config: Readonly<Config>): string[] {
  if (isLoopbackHost(config.grpcHost)) return [];
  const where = `GRPC_HOST=${config.grpcHost} is not a loopback address`;
  if (config.authTokensFile === null) {
    if (!config.allowInsecure) {
      throw new ConfigError(
        `${where} and AUTH_TOKENS_FILE is not set: anyone who can reach the port could move money. ` +
          'Set AUTH_TOKENS_FILE (and TLS_CERT_FILE/TLS_KEY_FILE), listen on 127.0.0.1, ' +
          'or set ALLOW_INSECURE=true to accept the risk',
      );
    }
    return [
      `INSECURE: authentication is OFF and ${where}; anyone who can reach port ${config.grpcPort} may call every RPC ` +
        '(ALLOW_INSECURE=true). Set AUTH_TOKENS_FILE.',
    ];
  }
  if (config.tls === null) {
    return [`${where} and TLS is off: bearer tokens and data travel in clear text. Set TLS_CERT_FILE and TLS_KEY_FILE.`];
  }
  return [];
}

function metrics(env: Env, grpcHost: string, grpcPort: number): MetricsConfig | null {
  const hostRaw = env.METRICS_HOST?.trim();
  const allowRemote = bool(env, 'METRICS_ALLOW_REMOTE', false);
  if (env.METRICS_PORT === undefined || env.METRICS_PORT.trim() === '') {
    if (hostRaw) throw new ConfigError('METRICS_HOST is set but METRICS_PORT is not; set METRICS_PORT to turn metrics on');
    return null;
  }
  const port = int(env, 'METRICS_PORT', 0, 0, 65535);
  const host = hostRaw || '127.0.0.1';
  if (port !== 0 && port === grpcPort && host === grpcHost) {
    throw new ConfigError(`METRICS_PORT must differ from GRPC_PORT (both ${port} on ${host})`);
  }
  return Object.freeze({ host, port, allowRemote });
}

const DURATION_UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** A duration such as "30d", "12h", "90m" or "45s" (a whole number and one unit), in ms. */
export function parseDuration(name: string, raw: string): number {
  const match = /^(\d{1,9})([smhd])$/.exec(raw.trim());
  if (!match) throw new ConfigError(`${name} must be a whole number and a unit (s, m, h or d), e.g. "30d" or "12h"; got ${JSON.stringify(raw)}`);
  return Number(match[1]) * DURATION_UNITS[match[2]];
}

function events(env: Env): EventsConfig {
  const d = DEFAULT_EVENTS_CONFIG;
  const raw = env.EVENT_RETENTION;
  const retentionMs = raw === undefined || raw.trim() === '' ? d.retentionMs : parseDuration('EVENT_RETENTION', raw);
  // At least a minute: a shorter retention would expire the cursors of consumers that merely reconnect.
  if (retentionMs < 60_000 || retentionMs > 3650 * 86_400_000) {
    throw new ConfigError(`EVENT_RETENTION must be between 1m and 3650d, got ${JSON.stringify(raw)}`);
  }
  return {
    retentionMs,
    pollMs: int(env, 'EVENT_POLL_MS', d.pollMs, 1, 10_000),
    watchBuffer: int(env, 'EVENT_WATCH_BUFFER', d.watchBuffer, 10, 1_000_000),
  };
}

function cron(env: Env): string | null {
  const raw = (env.INGEST_CRON ?? '0 * * * *').trim();
  if (raw === 'off') return null;
  try {
    new CronTime(raw, 'UTC');
  } catch (e) {
    throw new ConfigError(`INGEST_CRON is not a valid cron expression (${raw}): ${(e as Error).message}`);
  }
  return raw;
}

function database(env: Env): DatabaseConfig {
  const url = env.DATABASE_URL?.trim();
  if (url) {
    if (!/^postgres(ql)?:\/\//.test(url)) throw new ConfigError('DATABASE_URL must start with postgres:// or postgresql://');
    return { kind: 'postgresql', url };
  }
  return { kind: 'sqlite', path: env.DB_PATH?.trim() || './billing.db' };
}

export function loadConfig(env: Env = process.env): Readonly<Config> {
  const currency = (env.CURRENCY ?? 'USD').trim().toUpperCase();
  if (!/^[A-Z]{3}$/.test(currency)) throw new ConfigError(`CURRENCY must be a 3-letter ISO 4217 code, got ${JSON.stringify(env.CURRENCY)}`);
  const logLevel = (env.LOG_LEVEL ?? 'info').trim();
  if (!['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent`);
  }
  const host = (env.GRPC_HOST ?? '127.0.0.1').trim();
  if (host === '') throw new ConfigError('GRPC_HOST must not be empty');
  const grpcPort = int(env, 'GRPC_PORT', 50051, 0, 65535);
  return Object.freeze({
    grpcHost: host,
    grpcPort,
    database: database(env),
    logLevel,
    accessLog: bool(env, 'ACCESS_LOG', false),
    currency,
    logFilePath: env.LOG_FILE_PATH?.trim() || './data/usage-logs.json',
    usageReadTimeoutMs: int(env, 'USAGE_READ_TIMEOUT_MS', 30_000, 100, 3_600_000),
    usageBatchMax: int(env, 'USAGE_BATCH_MAX', 1000, 1, 10_000),
    usageWriter: usageWriter(env),
    lowBalanceThreshold: money(env, 'LOW_BALANCE_THRESHOLD', '0'),
    pricing: env.PRICING ? parsePricing(env.PRICING) : parsePricing(JSON.stringify(DEFAULT_PRICING)),
    retryBaseDelayMs: int(env, 'RETRY_BASE_DELAY_MS', 1000, 1, 86_400_000),
    maxRetries: int(env, 'MAX_RETRIES', 5, 0, 30),
    ingestCron: cron(env),
    maxFutureSkewMs: int(env, 'MAX_FUTURE_SKEW_MS', 300_000, 0, 86_400_000),
    shutdownGraceMs: int(env, 'SHUTDOWN_GRACE_MS', 10_000, 0, 600_000),
    authTokensFile: filePath(env, 'AUTH_TOKENS_FILE'),
    tls: tls(env),
    allowInsecure: bool(env, 'ALLOW_INSECURE', false),
    limits: Object.freeze(limits(env)),
    metrics: metrics(env, host, grpcPort),
    events: Object.freeze(events(env)),
  });
}
