/**
 * The only reader of process.env. Every setting is validated here; an invalid
 * value stops start-up with a message naming the variable.
 */
import { CronTime } from 'cron';
import { DecimalError, MONEY_SCALE, parseDecimal } from './shared/money';

export type DatabaseConfig =
  | { kind: 'sqlite'; path: string }
  | { kind: 'postgresql'; url: string };

export interface Config {
  grpcHost: string;
  grpcPort: number;
  database: DatabaseConfig;
  logLevel: string;
  currency: string;
  logFilePath: string;
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
}

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
  return Object.freeze({
    grpcHost: host,
    grpcPort: int(env, 'GRPC_PORT', 50051, 0, 65535),
    database: database(env),
    logLevel,
    currency,
    logFilePath: env.LOG_FILE_PATH?.trim() || './data/usage-logs.json',
    pricing: env.PRICING ? parsePricing(env.PRICING) : parsePricing(JSON.stringify(DEFAULT_PRICING)),
    retryBaseDelayMs: int(env, 'RETRY_BASE_DELAY_MS', 1000, 1, 86_400_000),
    maxRetries: int(env, 'MAX_RETRIES', 5, 0, 30),
    ingestCron: cron(env),
    maxFutureSkewMs: int(env, 'MAX_FUTURE_SKEW_MS', 300_000, 0, 86_400_000),
    shutdownGraceMs: int(env, 'SHUTDOWN_GRACE_MS', 10_000, 0, 600_000),
  });
}
