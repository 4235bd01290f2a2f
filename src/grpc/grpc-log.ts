/**
 * grpc-js's own log output, routed into pino with request header values
 * redacted. Installed when the gRPC server is created.
 *
 * grpc-js logs through one process-wide logger (`grpc.setLogger`) that prints
 * to stderr by default, and some of its messages carry request header values:
 * - "Failed to add metadata entry <key>: <value>. Metadata string value
 *   "<value>" contains illegal characters", when a header value is not valid
 *   gRPC metadata (printable ASCII), e.g. `authorization: Bearer<TAB><token>`
 *   (node_modules/@grpc/grpc-js/build/src/metadata.js, fromHttp2Headers);
 * - with GRPC_TRACE set, "Request to <path> received headers {...}" with every
 *   request header (server-interceptors.js), and client-side traces.
 * A dropped header is logged as its name only; any other message is logged
 * with header values, `authorization` values and `Bearer` credentials
 * replaced by "[redacted]". Nothing of grpc-js goes to stderr any more.
 *
 * The dropped header is also a signal (see takeDroppedHeaders). grpc-js parses
 * a call's request headers into metadata in the constructor of the call
 * object it then hands, in the same synchronous run, to the server
 * interceptors, and the metadata they see has no trace of a dropped value.
 * So the key reported here, during that constructor, is taken by the
 * interceptors of that very call (./auth.ts turns a dropped `authorization`
 * into MALFORMED_TOKEN rather than MISSING_TOKEN). What no call takes is
 * forgotten at the next microtask, so it can never leak into another call.
 *
 * State: grpc-js's logger is process-wide, so this module's state is too (the
 * one exception to "no module-level state"). The newest server's logger wins.
 */
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';

const REDACTED = '[redacted]';

const state: { log: Logger | null; dropped: string[]; clearScheduled: boolean } = {
  log: null,
  dropped: [],
  clearScheduled: false,
};

/** The header names grpc-js dropped while setting up the call being created right now (and forgets them). */
export function takeDroppedHeaders(): string[] {
  const taken = state.dropped;
  state.dropped = [];
  return taken;
}

function noteDropped(header: string): void {
  state.dropped.push(header);
  if (state.clearScheduled) return;
  state.clearScheduled = true;
  queueMicrotask(() => {
    state.dropped = [];
    state.clearScheduled = false;
  });
}

/** A JSON dump of headers or metadata with every value replaced; unparseable: all of it. */
function redactHeaderDump(json: string): string {
  try {
    const parsed = JSON.parse(json) as unknown;
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return REDACTED;
    return JSON.stringify(Object.fromEntries(Object.keys(parsed).map((key) => [key, REDACTED])));
  } catch {
    return REDACTED;
  }
}

/** A grpc-js log message with header values, authorization values and bearer credentials removed. */
export function redactGrpcMessage(text: string): string {
  const dropped = /Failed to add metadata entry ([^\s:]+):/.exec(text);
  if (dropped) return `Failed to add metadata entry ${dropped[1]}: ${REDACTED}`;
  return (
    text
      // "... received headers {"authorization":["Bearer ..."],...}": keep the names only.
      .replace(/(headers:? )(\{.*\})/gs, (_m, lead: string, json: string) => lead + redactHeaderDump(json))
      // Backstops for any other shape: an authorization value, a bearer credential.
      .replace(/(authorization["']?\s*[:=]\s*)(?!\[?\s*["']?\[redacted\])(\[?\s*["']?)[^"'\]\r\n]*/gi, `$1$2${REDACTED}`)
      .replace(/\b(bearer)[\s\u00a0]+[^\s"',\][]+/gi, `$1 ${REDACTED}`)
  );
}

const VERBOSITY: Readonly<Record<string, grpc.logVerbosity>> = {
  trace: grpc.logVerbosity.DEBUG,
  debug: grpc.logVerbosity.DEBUG,
  info: grpc.logVerbosity.INFO,
};

/**
 * Routes grpc-js's logging to `log` from now on. grpc-js's verbosity follows
 * the pino level (GRPC_VERBOSITY no longer applies), but never below ERROR:
 * dropped headers must always be seen, even when pino prints nothing.
 */
export function installGrpcLogger(log: Logger): void {
  state.log = log;
  const emit = (level: 'error' | 'info' | 'debug', args: unknown[]) => {
    const text = args.map(String).join(' ');
    const target = state.log;
    const dropped = /^Failed to add metadata entry ([^\s:]+):/.exec(text);
    if (dropped) {
      const header = dropped[1].toLowerCase();
      noteDropped(header);
      target?.warn({ grpc: true, header }, 'request header dropped: its value is not valid gRPC metadata (value not logged)');
      return;
    }
    target?.[level]({ grpc: true }, redactGrpcMessage(text));
  };
  grpc.setLogger({
    error: (...args: unknown[]) => emit('error', args),
    info: (...args: unknown[]) => emit('info', args),
    debug: (...args: unknown[]) => emit('debug', args),
  });
  grpc.setLogVerbosity(VERBOSITY[log.level] ?? grpc.logVerbosity.ERROR);
}
