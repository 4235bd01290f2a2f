/**
 * Bearer-token authentication and role-based authorization, as a grpc-js
 * server interceptor.
 *
 * - Tokens come from AUTH_TOKENS_FILE, a JSON list of
 *   `{"name": "...", "token": "...", "role": "service" | "operator"}`,
 *   validated at start-up (unique names and tokens, at least 16 characters).
 *   Only their sha256 digests are kept; a presented token is hashed too and
 *   compared against every digest with `timingSafeEqual`, so neither the
 *   content nor the length of a token leaks through timing.
 * - Clients send metadata `authorization: Bearer <token>`. A missing,
 *   malformed or unknown token is UNAUTHENTICATED; a known caller whose role
 *   may not call the method is PERMISSION_DENIED. Either way the status is
 *   sent before the request message is even read, so the handler never runs.
 * - gRPC health and reflection stay open.
 * - An `authorization` header grpc-js could not take as metadata (a tab or a
 *   non-breaking space in it) is MALFORMED_TOKEN; ./grpc-log.ts keeps its
 *   value out of the log and tells this interceptor it was there.
 * - The `authorization` entry is removed before the metadata reaches a
 *   handler, and no token ever goes to a log: only the caller's name does.
 * - A refused call's `rpc` line is written only with the access log on
 *   (ACCESS_LOG=true) or at LOG_LEVEL=debug (./rpc-log.ts): a client retrying
 *   with a bad token must not flood the log. It is always counted in the
 *   metrics (billing_rpc_calls_total), so refusals show there instead.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { ConfigError } from '../config';
import { AppError } from '../shared/errors';
import { noMetrics, type Metrics } from '../shared/metrics';
import { takeDroppedHeaders } from './grpc-log';
import { rpcLogLevel } from './rpc-log';
import { describeError } from './status';

export type Role = 'service' | 'operator';

export const ROLES: readonly Role[] = ['service', 'operator'];

/** Who made a call: the token's name (safe to log) and its role. */
export interface Caller {
  name: string;
  role: Role;
}

export interface TokenTable {
  /** The caller whose token this is, or null. Takes the same time whichever token matches, if any. */
  authenticate(token: string): Caller | null;
  /** The names of the configured tokens, in file order. */
  readonly names: readonly string[];
}

/** The services anyone may call without a token. */
export const OPEN_SERVICES: ReadonlySet<string> = new Set([
  'grpc.health.v1.Health',
  'grpc.reflection.v1.ServerReflection',
  'grpc.reflection.v1alpha.ServerReflection',
]);

const BOTH: readonly Role[] = ['service', 'operator'];
const OPERATOR: readonly Role[] = ['operator'];

/**
 * Full method path -> the roles that may call it. A method missing here is
 * operator-only, so a new RPC is never opened to services by accident.
 */
export const METHOD_ROLES: Readonly<Record<string, readonly Role[]>> = Object.freeze({
  '/billing.v1.UserService/CreateUser': BOTH,
  '/billing.v1.UserService/GetUser': BOTH,
  '/billing.v1.UserService/ListUsers': BOTH,
  '/billing.v1.UserService/UpdateUser': BOTH,
  '/billing.v1.UserService/DeleteUser': OPERATOR,
  '/billing.v1.UserService/SuspendUser': OPERATOR,
  '/billing.v1.UserService/ActivateUser': OPERATOR,

  '/billing.v1.WalletService/GetWallet': BOTH,
  '/billing.v1.WalletService/GetBalance': BOTH,
  '/billing.v1.WalletService/AddFunds': BOTH,
  '/billing.v1.WalletService/ListWalletTransactions': BOTH,
  '/billing.v1.WalletService/SetBalanceAlert': OPERATOR,
  '/billing.v1.WalletService/GetBalanceAlert': BOTH,

  '/billing.v1.BillingService/CreateBillingRecord': BOTH,
  '/billing.v1.BillingService/GetBillingRecord': BOTH,
  '/billing.v1.BillingService/ListBillingRecords': BOTH,
  '/billing.v1.BillingService/ProcessBillingRecord': BOTH,
  '/billing.v1.BillingService/ListUsageLogs': BOTH,

  '/billing.v1.JobService/ProcessLogs': OPERATOR,
  '/billing.v1.JobService/ProcessRetries': OPERATOR,
  '/billing.v1.JobService/ProcessAll': OPERATOR,
  '/billing.v1.JobService/ListJobRuns': OPERATOR,

  '/billing.v1.UsageService/RecordUsage': BOTH,
  '/billing.v1.UsageService/StreamUsage': BOTH,
  '/billing.v1.UsageService/GetUsageSummary': BOTH,

  // Other services follow what changed (users, wallets, records, alerts, job runs); so may operators.
  '/billing.v1.EventService/WatchEvents': BOTH,
  '/billing.v1.EventService/ListEvents': BOTH,
});

/** '/pkg.Service/Method' -> 'pkg.Service'. */
export const serviceOf = (path: string): string => path.split('/')[1] ?? '';

/** '/pkg.Service/Method' -> 'Method', the name the adapter logs. */
export const methodOf = (path: string): string => path.slice(path.lastIndexOf('/') + 1);

/** The roles that may call a method: 'open' for health and reflection. */
export function rolesFor(path: string): readonly Role[] | 'open' {
  if (OPEN_SERVICES.has(serviceOf(path))) return 'open';
  return METHOD_ROLES[path] ?? OPERATOR;
}

// ---------------------------------------------------------------- token file

export const TOKENS_VARIABLE = 'AUTH_TOKENS_FILE';
export const MIN_TOKEN_LENGTH = 16;
const MAX_TOKEN_LENGTH = 1024;
/**
 * RFC 6750 b64token: what fits in `Bearer <token>` unchanged (grpc-js splits
 * header values at commas, so a comma or space could never match).
 * `openssl rand -hex 32` and `openssl rand -base64 32` both fit.
 */
const TOKEN_PATTERN = /^[A-Za-z0-9\-._~+/]+=*$/;
const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;
const ENTRY_KEYS = ['name', 'role', 'token'];

const isRole = (value: string): value is Role => (ROLES as readonly string[]).includes(value);

const sha256 = (text: string): Buffer => createHash('sha256').update(text, 'utf8').digest();

interface Entry {
  caller: Caller;
  digest: Buffer;
}

/**
 * Parses and validates the tokens file's text. Error messages name entries
 * by position and name, never quote a token (nor the file text, which a
 * JSON.parse message would).
 */
export function parseTokens(text: string, source: string = TOKENS_VARIABLE): TokenTable {
  // Annotated, so that TypeScript narrows after each `fail(...)`.
  const fail: (why: string) => never = (why) => {
    throw new ConfigError(`${source}: ${why}`);
  };
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    fail('is not valid JSON (expected [{"name": "...", "token": "...", "role": "service"}])');
  }
  if (!Array.isArray(parsed)) return fail('must be a JSON list of {"name", "token", "role"} objects');
  if (parsed.length === 0) fail('lists no tokens; every call would be refused');

  const entries: Entry[] = [];
  const names = new Set<string>();
  const digests = new Map<string, string>(); // hex digest -> name
  for (const [i, raw] of (parsed as unknown[]).entries()) {
    const at = `entry ${i + 1}`;
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail(`${at} must be an object`);
    const item = raw as Record<string, unknown>;
    const unknownKeys = Object.keys(item).filter((k) => !ENTRY_KEYS.includes(k));
    if (unknownKeys.length > 0) {
      // A key could be a misplaced token: only ones too short to be a token are quoted.
      const shown = unknownKeys.filter((k) => k.length < MIN_TOKEN_LENGTH).join(', ') || 'a long one, not shown';
      fail(`${at} has unknown field(s) (${shown}); expected name, token, role`);
    }

    const { name, token, role } = item;
    if (typeof name !== 'string' || !NAME_PATTERN.test(name)) {
      fail(`${at}: name must be 1-64 letters, digits or . _ @ - (it is what the logs show)`);
    }
    const who = `${at} (${name})`;
    if (names.has(name)) fail(`${who}: the name is used twice; names must be unique`);
    if (typeof role !== 'string' || !isRole(role)) fail(`${who}: role must be one of ${ROLES.join(', ')}`);
    if (typeof token !== 'string') fail(`${who}: token must be a string`);
    if (token.length < MIN_TOKEN_LENGTH) {
      fail(`${who}: token must be at least ${MIN_TOKEN_LENGTH} characters; make one with: openssl rand -hex 32`);
    }
    if (token.length > MAX_TOKEN_LENGTH) fail(`${who}: token must be at most ${MAX_TOKEN_LENGTH} characters`);
    if (!TOKEN_PATTERN.test(token)) {
      fail(`${who}: token may only hold letters, digits and - . _ ~ + / (then =), as openssl rand -hex 32 makes`);
    }
    const digest = sha256(token);
    const key = digest.toString('hex');
    const other = digests.get(key);
    if (other !== undefined) fail(`${who}: same token as ${other}; tokens must be unique`);

    names.add(name);
    digests.set(key, name);
    entries.push({ caller: Object.freeze({ name, role }), digest });
  }

  return {
    names: Object.freeze(entries.map((e) => e.caller.name)),
    authenticate(token) {
      const digest = sha256(token);
      let found: Caller | null = null;
      // No early exit: every digest is compared, whatever matches.
      for (const entry of entries) {
        if (timingSafeEqual(digest, entry.digest)) found = entry.caller;
      }
      return found;
    },
  };
}

/**
 * A start-up warning when the tokens file may be read or changed by anyone but
 * its owner (mode & 0o077): the file holds every token in clear.
 */
export function tokensFileWarning(path: string): { message: string; mode: string } | null {
  if (process.platform === 'win32') return null; // no Unix permission bits
  let mode: number;
  try {
    mode = fs.statSync(path).mode & 0o777;
  } catch {
    return null; // loadTokensFile reports an unreadable file
  }
  if ((mode & 0o077) === 0) return null;
  const octal = `0${mode.toString(8).padStart(3, '0')}`;
  const what = [mode & 0o044 ? 'readable' : '', mode & 0o022 ? 'writable' : ''].filter(Boolean).join(' and ') || 'open';
  return {
    mode: octal,
    message:
      `${TOKENS_VARIABLE} (${path}) is ${what} by group or others (mode ${octal}): other local users could read ` +
      `or change the tokens. Make it the service user's alone: chmod 600 ${path}`,
  };
}

/** Reads and validates AUTH_TOKENS_FILE; any problem is a ConfigError naming it. */
export function loadTokensFile(path: string): TokenTable {
  let text: string;
  try {
    text = fs.readFileSync(path, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'unreadable';
    throw new ConfigError(`${TOKENS_VARIABLE}: cannot read ${path} (${code})`);
  }
  return parseTokens(text, `${TOKENS_VARIABLE} (${path})`);
}

// --------------------------------------------------------------- the checks

export const MISSING_TOKEN = 'MISSING_TOKEN';
export const MALFORMED_TOKEN = 'MALFORMED_TOKEN';
export const INVALID_TOKEN = 'INVALID_TOKEN';
export const ROLE_NOT_ALLOWED = 'ROLE_NOT_ALLOWED';

const BEARER = /^Bearer +([A-Za-z0-9\-._~+/]+=*)$/i;

export type Verdict = { ok: true; caller: Caller | null } | { ok: false; error: AppError; caller?: Caller };

const malformed = (): Verdict => ({
  ok: false,
  error: new AppError('UNAUTHENTICATED', MALFORMED_TOKEN, 'the authorization metadata must be one "Bearer <token>"'),
});

/**
 * Decides one call from its method path and its `authorization` metadata
 * values. `headerDropped`: the client sent an authorization header that grpc-js
 * could not turn into metadata (see ./grpc-log.ts), so it is malformed, not
 * missing. `caller` is null for an open method.
 */
export function authorize(
  tokens: TokenTable,
  path: string,
  authorization: grpc.MetadataValue[],
  headerDropped = false,
): Verdict {
  const roles = rolesFor(path);
  if (roles === 'open') return { ok: true, caller: null };
  if (headerDropped) return malformed();
  if (authorization.length === 0) {
    return {
      ok: false,
      error: new AppError('UNAUTHENTICATED', MISSING_TOKEN, 'missing credentials: send metadata "authorization: Bearer <token>"'),
    };
  }
  const header = authorization.length === 1 && typeof authorization[0] === 'string' ? authorization[0] : '';
  const match = BEARER.exec(header);
  if (!match) return malformed();
  const caller = tokens.authenticate(match[1]);
  if (!caller) return { ok: false, error: new AppError('UNAUTHENTICATED', INVALID_TOKEN, 'the token is not valid') };
  if (!roles.includes(caller.role)) {
    return {
      ok: false,
      caller,
      error: new AppError('PERMISSION_DENIED', ROLE_NOT_ALLOWED, `role ${caller.role} may not call ${path.slice(1)}`),
    };
  }
  return { ok: true, caller };
}

// --------------------------------------------------------- the interceptor

export interface AuthInterceptorDeps {
  tokens: TokenTable;
  log: Logger;
  /**
   * Where the interceptor records who made each admitted call, keyed by the
   * request metadata object the handler receives (the adapter logs the name).
   */
  callers: WeakMap<grpc.Metadata, Caller>;
  /** ACCESS_LOG: refused calls get an info line too (default false; see ./rpc-log.ts). */
  accessLog?: boolean;
  /** Where refused calls are counted, as the adapter counts the admitted ones (default: nowhere). */
  metrics?: Metrics;
}

/**
 * The interceptor. A refused call gets its status (with the same
 * `billing-error-reason` trailer and ErrorInfo details as every other error)
 * and its `rpc` log line (when ./rpc-log.ts wants one) here, since it never
 * reaches the adapter.
 */
export function createAuthInterceptor(deps: AuthInterceptorDeps): grpc.ServerInterceptor {
  const { tokens, log, callers, accessLog = false, metrics = noMetrics } = deps;
  return (method, call) => {
    // Taken now, while grpc-js is still setting up this call: later it could be another call's.
    const headerDropped = takeDroppedHeaders().includes('authorization');
    if (rolesFor(method.path) === 'open') return new grpc.ServerInterceptingCall(call);
    const started = process.hrtime.bigint();
    return new grpc.ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, admit) => {
            const verdict = authorize(tokens, method.path, metadata.get('authorization'), headerDropped);
            if (verdict.ok) {
              metadata.remove('authorization');
              if (verdict.caller) callers.set(metadata, verdict.caller);
              admit(metadata);
              return;
            }
            // Not calling admit() holds back the request message and the
            // half-close, so the handler never starts.
            const status = describeError(verdict.error, log);
            call.sendStatus({ code: status.code, details: status.details, metadata: status.metadata });
            const durationMs = Number(process.hrtime.bigint() - started) / 1e6;
            metrics.rpcFinished(methodOf(method.path), grpc.status[status.code], durationMs / 1000);
            const level = rpcLogLevel({ method: methodOf(method.path), code: status.code, refused: true }, accessLog);
            if (!log.isLevelEnabled(level)) return;
            log[level](
              {
                method: methodOf(method.path),
                code: grpc.status[status.code],
                reason: status.reason,
                caller: verdict.caller?.name,
                peer: call.getPeer(),
                durationMs,
              },
              'rpc',
            );
          },
        }),
    });
  };
}
