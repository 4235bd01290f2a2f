/**
 * The unary adapter: turns a plain `async (request, ctx) => response` into a
 * grpc-js handler.
 *
 * - Every string field of the request is checked first: a control character
 *   (other than tab, LF, CR) is INVALID_ARGUMENT/INVALID_CHARACTERS naming the
 *   field (./request-strings.ts), whatever the RPC.
 * - Each call gets its own unit of work (a fork of the database's root entity
 *   manager) and an AbortSignal that aborts when the client cancels or its
 *   deadline passes, both handed down in ctx (../shared/context.ts).
 * - The callback runs exactly once, with the response or with the status the
 *   error table (./status.ts) picks for whatever was thrown.
 * - grpc-js does not await handlers, so no rejection may escape from here: an
 *   unhandled rejection would stop the process.
 * - At most one log line per RPC: { method, code, reason?, caller?, durationMs },
 *   at the level ./rpc-log.ts decides (error for INTERNAL and UNAVAILABLE,
 *   info for money-moving calls or with the access log on, else debug).
 *   `caller` is the name of the token that authenticated the call (never the
 *   token), when authentication is on.
 * - Every answered call is reported to the metrics (method, status code,
 *   duration), as it is logged.
 */
import * as grpc from '@grpc/grpc-js';
import type { EntityManager } from '@mikro-orm/knex';
import type { Logger } from 'pino';
import type { CallContext as DomainContext } from '../shared/context';
import { AppError } from '../shared/errors';
import { noMetrics, type Metrics } from '../shared/metrics';
import { checkRequestStrings } from './request-strings';
import { rpcLogLevel } from './rpc-log';
import { describeError, INTERNAL_MESSAGE, INTERNAL_REASON, type ErrorStatus } from './status';

/** What a handler gets: the domain's call context (unit of work, cancellation) and the request metadata. */
export interface CallContext extends DomainContext {
  /** The request metadata (headers). */
  metadata: grpc.Metadata;
}

export type UnaryHandler<Req, Res> = (request: Req, ctx: CallContext) => Promise<Res>;

export type Unary = <Req, Res>(name: string, handler: UnaryHandler<Req, Res>) => grpc.handleUnaryCall<Req, Res>;

export interface AdapterDeps {
  /** A new unit of work for each call (the database object's fork). */
  fork: () => EntityManager;
  log: Logger;
  /** The authenticated caller's name for a call's metadata, if any (see ./auth.ts). */
  callerOf?: (metadata: grpc.Metadata) => string | undefined;
  /** ACCESS_LOG: every call gets an info line (default false; see ./rpc-log.ts). */
  accessLog?: boolean;
  /** Where every answered call is counted (default: nowhere). */
  metrics?: Metrics;
}

/** Builds `unary(name, handler)` over the given root entity manager and logger. */
export function createUnary(deps: AdapterDeps): Unary {
  const { fork, log, callerOf = () => undefined, accessLog = false, metrics = noMetrics } = deps;

  return <Req, Res>(name: string, handler: UnaryHandler<Req, Res>): grpc.handleUnaryCall<Req, Res> =>
    (call, callback) => {
      const started = process.hrtime.bigint();
      const caller = callerOf(call.metadata);
      let answered = false;
      const durationMs = () => Number(process.hrtime.bigint() - started) / 1e6;

      const succeed = (response: Res) => {
        if (answered) return;
        answered = true;
        callback(null, response);
        const elapsedMs = durationMs();
        metrics.rpcFinished(name, 'OK', elapsedMs / 1000);
        const level = rpcLogLevel({ method: name, code: grpc.status.OK, refused: false }, accessLog);
        if (log.isLevelEnabled(level)) log[level]({ method: name, code: 'OK', caller, durationMs: elapsedMs }, 'rpc');
      };

      const fail = (err: unknown) => {
        if (answered) return;
        answered = true;
        let status: ErrorStatus;
        try {
          status = describeError(err, log);
        } catch {
          // The error table itself must not break the one-callback promise.
          status = { code: grpc.status.INTERNAL, details: INTERNAL_MESSAGE, metadata: new grpc.Metadata(), reason: INTERNAL_REASON };
        }
        callback({ code: status.code, details: status.details, metadata: status.metadata });
        const elapsedMs = durationMs();
        metrics.rpcFinished(name, grpc.status[status.code], elapsedMs / 1000);
        const level = rpcLogLevel({ method: name, code: status.code, refused: false }, accessLog);
        if (log.isLevelEnabled(level)) {
          log[level]({ method: name, code: grpc.status[status.code], reason: status.reason, caller, durationMs: elapsedMs }, 'rpc');
        }
      };

      // The client cancelled or its deadline passed: work not yet started is not started (see Database.transaction).
      // grpc-js also says 'cancelled' when the stream closes after the answer: that is no cancellation (and building
      // the error and aborting cost about a tenth of a GetBalance call). The signal and the unit of work are made on
      // first use: a call that reads through a reader connection needs neither.
      let abort: AbortController | undefined;
      let cancelled: AppError | undefined;
      call.once('cancelled', () => {
        if (answered) return;
        cancelled = new AppError('CANCELLED', 'CALL_CANCELLED', 'the call was cancelled by the client or its deadline');
        abort?.abort(cancelled);
      });
      let em: EntityManager | undefined;
      const ctx = {
        metadata: call.metadata,
        get signal(): AbortSignal {
          if (!abort) {
            abort = new AbortController();
            if (cancelled) abort.abort(cancelled);
          }
          return abort.signal;
        },
        get em(): EntityManager {
          return (em ??= fork());
        },
      };

      // Promise.resolve().then also catches a handler that throws synchronously.
      Promise.resolve()
        .then(() => {
          // One rule for every string of every request, before any handler sees it.
          checkRequestStrings(call.request);
          return handler(call.request, ctx);
        })
        .then(succeed, fail)
        .catch((err: unknown) => {
          // Only reached if calling back or logging threw; never let it escape.
          try {
            log.error({ err, method: name }, 'rpc adapter failure');
          } catch {
            /* the logger is gone too; nothing left to report to */
          }
        });
    };
}
