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

/** Per-RPC adapter options. */
export interface RpcOptions {
  /** Top-level request fields whose items the handler validates one by one (see checkRequestStrings). */
  ownRules?: readonly string[];
}

export type Unary = <Req, Res>(name: string, handler: UnaryHandler<Req, Res>, opts?: RpcOptions) => grpc.handleUnaryCall<Req, Res>;

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

  return <Req, Res>(name: string, handler: UnaryHandler<Req, Res>, opts: RpcOptions = {}): grpc.handleUnaryCall<Req, Res> =>
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
      // the error and aborting cost about a tenth of a GetBalance call). The signal, its listener and the unit of
      // work are made on first use: a call that reads through a reader connection needs none of them.
      let abort: AbortController | undefined;
      const cancel = () => {
        if (!answered) abort!.abort(new AppError('CANCELLED', 'CALL_CANCELLED', 'the call was cancelled by the client or its deadline'));
      };
      let em: EntityManager | undefined;
      const ctx = {
        metadata: call.metadata,
        get signal(): AbortSignal {
          if (!abort) {
            abort = new AbortController();
            if (call.cancelled) cancel();
            else call.once('cancelled', cancel);
          }
          return abort.signal;
        },
        get em(): EntityManager {
          return (em ??= fork());
        },
      };

      let work: Promise<Res>;
      try {
        // One rule for every string of every request, before any handler sees it.
        checkRequestStrings(call.request, opts.ownRules);
        work = Promise.resolve(handler(call.request, ctx));
      } catch (err) {
        work = Promise.reject(err); // the check, or a handler that throws before its first await
      }
      work
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

/**
 * A bidirectional stream of requests, each answered by one response, in
 * order: `handle` turns one request into its response (every string is
 * checked as for a unary call, each request has its own unit of work).
 *
 * Flow control: up to `window` requests are worked on at once (on SQLite
 * their writes may share a commit). The next request is read only when fewer
 * are in flight and the answers so far could be handed to HTTP/2 (`write`
 * returned true, or 'drain' came): a client that sends faster than the
 * service stores, or that does not read its answers, meets HTTP/2 flow
 * control instead of growing the server's memory. What one stream holds is
 * bounded: `window` requests in work, grpc-js's read buffer (16 messages) and
 * its write buffer (16 answers).
 *
 * The first failure ends the stream with its status (the answers before it
 * were sent; requests after it were not answered, and may or may not have
 * been applied). A client that cancels, or whose deadline passes, stops it:
 * work not yet started is not started. One log line per stream, as for a
 * unary call, with how many requests it answered.
 */
/**
 * One message of a stream: `sequence` counts from 1; `previous` is the work of
 * the message before it (settled or not), for handlers whose messages must
 * take effect in stream order.
 */
export type BidiHandler<Req, Res> = (request: Req, ctx: CallContext, sequence: number, previous: Promise<unknown>) => Promise<Res>;

export type Bidi = <Req, Res>(
  name: string,
  handle: BidiHandler<Req, Res>,
  opts: RpcOptions & { window: number },
) => grpc.handleBidiStreamingCall<Req, Res>;

/**
 * Reads a call's messages one at a time: the stream is paused while a message
 * waits to be taken, so grpc-js reads no further than its own buffer. (Not the
 * stream's async iterator: at the end of the requests it destroys the whole
 * duplex, answers still to be written included.) null: the client has ended.
 */
function pull<T>(stream: NodeJS.ReadableStream): () => Promise<{ value: T } | null> {
  const buffered: T[] = [];
  let ended = false;
  let wake: (() => void) | null = null;
  stream.on('data', (message: T) => {
    buffered.push(message);
    stream.pause();
    wake?.();
  });
  stream.on('end', () => {
    ended = true;
    wake?.();
  });
  return async () => {
    while (buffered.length === 0 && !ended) {
      await new Promise<void>((resolve) => (wake = resolve));
      wake = null;
    }
    if (buffered.length === 0) return null;
    const value = buffered.shift()!;
    if (buffered.length === 0 && !ended) stream.resume();
    return { value };
  };
}

/**
 * Ends a stream with the status `err` maps to (INTERNAL when mapping it fails) and returns that status, for the
 * call's log line.
 */
function failStream(call: { emit(event: 'error', error: Partial<grpc.StatusObject>): boolean }, err: unknown, log: Logger): ErrorStatus {
  let status: ErrorStatus;
  try {
    status = describeError(err, log);
  } catch {
    status = { code: grpc.status.INTERNAL, details: INTERNAL_MESSAGE, metadata: new grpc.Metadata(), reason: INTERNAL_REASON };
  }
  call.emit('error', { code: status.code, details: status.details, metadata: status.metadata });
  return status;
}

export function createBidi(deps: AdapterDeps): Bidi {
  const { fork, log, callerOf = () => undefined, accessLog = false } = deps;
  return <Req, Res>(name: string, handle: BidiHandler<Req, Res>, opts: RpcOptions & { window: number }): grpc.handleBidiStreamingCall<Req, Res> =>
    (call) => {
      const started = process.hrtime.bigint();
      const caller = callerOf(call.metadata);
      const abort = new AbortController();
      call.once('cancelled', () => abort.abort(new AppError('CANCELLED', 'CALL_CANCELLED', 'the call was cancelled by the client or its deadline')));
      /** Stops reading and writing: the call was cancelled, or an answer failed. */
      const halt = new AbortController();
      abort.signal.addEventListener('abort', () => halt.abort(abort.signal.reason), { once: true });
      let answered = 0;
      const finish = (code: grpc.status, reason?: string) => {
        const level = rpcLogLevel({ method: name, code, refused: false }, accessLog);
        if (log.isLevelEnabled(level)) {
          log[level]({ method: name, code: grpc.status[code], reason, caller, answered, durationMs: Number(process.hrtime.bigint() - started) / 1e6 }, 'rpc');
        }
      };
      /** Resolves with `p`, or rejects as soon as the stream halts. */
      const unlessHalted = <T>(p: Promise<T>): Promise<T> =>
        new Promise<T>((resolve, reject) => {
          if (halt.signal.aborted) return reject(halt.signal.reason);
          const onHalt = () => reject(halt.signal.reason);
          halt.signal.addEventListener('abort', onHalt, { once: true });
          p.then(
            (value) => {
              halt.signal.removeEventListener('abort', onHalt);
              resolve(value);
            },
            (err: unknown) => {
              halt.signal.removeEventListener('abort', onHalt);
              reject(err);
            },
          );
        });
      const run = async () => {
        const nextRequest = pull<Req>(call);
        /** Requests in work, oldest first; each is answered as soon as it and those before it are done. */
        const inFlight: Promise<Res>[] = [];
        /** The work of the last message read (what the next one's handler is given as `previous`). */
        let lastWork: Promise<unknown> = Promise.resolve();
        let readError: { error: unknown } | null = null;
        let readerDone = false;
        let wakeReader: (() => void) | null = null;
        let wakeWriter: (() => void) | null = null;
        const sleepUntil = (set: (wake: () => void) => void) => unlessHalted(new Promise<void>((resolve) => set(resolve)));
        const reader = async () => {
          try {
            for (let sequence = 1; ; sequence++) {
              while (inFlight.length >= opts.window) await sleepUntil((w) => (wakeReader = w));
              const next = await unlessHalted(nextRequest());
              if (next === null) break;
              const request = next.value;
              checkRequestStrings(request, opts.ownRules);
              const previous = lastWork;
              const work = Promise.resolve().then(() => handle(request, { em: fork(), signal: abort.signal, metadata: call.metadata }, sequence, previous));
              work.catch(() => undefined); // awaited in order by the writer; never left unhandled meanwhile
              lastWork = work.catch(() => undefined);
              inFlight.push(work);
              wakeWriter?.();
            }
          } catch (error) {
            // A bad request: the ones before it are still answered, then the stream ends with its status.
            if (!halt.signal.aborted) readError = { error };
          } finally {
            readerDone = true;
            wakeWriter?.();
          }
        };
        const writer = async () => {
          try {
            for (;;) {
              while (inFlight.length === 0) {
                if (readerDone) return;
                await sleepUntil((w) => (wakeWriter = w));
              }
              const response = await unlessHalted(inFlight[0]);
              answered++;
              if (!call.write(response)) await sleepUntil((w) => call.once('drain', w));
              inFlight.shift();
              wakeReader?.();
            }
          } catch (err) {
            halt.abort(err);
            throw err;
          }
        };
        await Promise.all([reader(), writer()]);
        if (readError) throw (readError as { error: unknown }).error;
      };
      run().then(
        () => {
          call.end();
          finish(grpc.status.OK);
        },
        (err: unknown) => {
          if (abort.signal.aborted) return finish(grpc.status.CANCELLED, 'CALL_CANCELLED');
          const status = failStream(call, err, log);
          finish(status.code, status.reason);
        },
      ).catch((err: unknown) => {
        try {
          log.error({ err, method: name }, 'rpc adapter failure');
        } catch {
          /* nothing left to report to */
        }
      });
    };
}

/**
 * A server stream: one request, then messages until the handler ends
 * (resolves: OK; throws: the status the error table picks). The handler gets
 * the call context plus `send`, which hands one message to grpc-js and waits
 * whenever grpc-js's write buffer is full (`write` returned false) until
 * 'drain': a client that does not read meets HTTP/2 flow control, and the
 * handler decides what to do with what piles up meanwhile. `send` rejects as
 * soon as the call is cancelled, the server shuts down, or the signal passed
 * to it aborts.
 *
 * Server shutdown (`closing` aborts) ends every open stream at once with
 * UNAVAILABLE [SHUTTING_DOWN], so that a long-lived stream does not hold the
 * graceful shutdown for its whole grace period and its client reconnects to
 * another replica. The request's strings are checked as for a unary call.
 * One log line per stream when it ends, with how many messages it sent (at
 * the unary policy's level; a stream ended by shutdown is no server fault:
 * debug, or info with the access log), and one report to the metrics.
 */
export interface ServerStreamContext<Res> extends CallContext {
  /** Sends one message; resolves when the next may be sent. */
  send(message: Res, signal?: AbortSignal): Promise<void>;
}

export type ServerStreamHandler<Req, Res> = (request: Req, ctx: ServerStreamContext<Res>) => Promise<void>;

export type ServerStream = <Req, Res>(
  name: string,
  handler: ServerStreamHandler<Req, Res>,
  opts?: RpcOptions,
) => grpc.handleServerStreamingCall<Req, Res>;

export const SHUTTING_DOWN = 'SHUTTING_DOWN';

export function createServerStream(deps: AdapterDeps & { closing?: AbortSignal }): ServerStream {
  const { fork, log, callerOf = () => undefined, accessLog = false, metrics = noMetrics, closing } = deps;
  return <Req, Res>(name: string, handler: ServerStreamHandler<Req, Res>, opts: RpcOptions = {}): grpc.handleServerStreamingCall<Req, Res> =>
    (call) => {
      const started = process.hrtime.bigint();
      const caller = callerOf(call.metadata);
      const abort = new AbortController();
      let cancelled = false;
      let shutDown = false;
      const onCancel = () => {
        cancelled = true;
        abort.abort(new AppError('CANCELLED', 'CALL_CANCELLED', 'the call was cancelled by the client or its deadline'));
      };
      const onClosing = () => {
        shutDown = true;
        abort.abort(new AppError('UNAVAILABLE', SHUTTING_DOWN, 'the server is shutting down; call again (another replica will answer)'));
      };
      call.once('cancelled', onCancel);
      if (closing?.aborted) onClosing();
      else closing?.addEventListener('abort', onClosing, { once: true });
      let sent = 0;

      const send = (message: Res, signal?: AbortSignal): Promise<void> => {
        const stops = signal ? [abort.signal, signal] : [abort.signal];
        const stopped = stops.find((s) => s.aborted);
        if (stopped) return Promise.reject(stopped.reason as Error);
        sent++;
        if (call.write(message)) return Promise.resolve();
        return new Promise<void>((resolve, reject) => {
          const done = () => {
            call.removeListener('drain', onDrain);
            for (const s of stops) s.removeEventListener('abort', onStop);
          };
          const onDrain = () => {
            done();
            resolve();
          };
          const onStop = () => {
            done();
            reject((stops.find((s) => s.aborted)?.reason ?? abort.signal.reason) as Error);
          };
          call.once('drain', onDrain);
          for (const s of stops) s.addEventListener('abort', onStop, { once: true });
        });
      };

      let em: EntityManager | undefined;
      const ctx: ServerStreamContext<Res> = {
        metadata: call.metadata,
        signal: abort.signal,
        get em(): EntityManager {
          return (em ??= fork());
        },
        send,
      };

      const finish = (code: grpc.status, reason?: string) => {
        closing?.removeEventListener('abort', onClosing);
        const durationMs = Number(process.hrtime.bigint() - started) / 1e6;
        metrics.rpcFinished(name, grpc.status[code], durationMs / 1000);
        const level = shutDown ? (accessLog ? 'info' : 'debug') : rpcLogLevel({ method: name, code, refused: false }, accessLog);
        if (log.isLevelEnabled(level)) log[level]({ method: name, code: grpc.status[code], reason, caller, sent, durationMs }, 'rpc');
      };

      Promise.resolve()
        .then(() => {
          checkRequestStrings(call.request, opts.ownRules);
          return handler(call.request, ctx);
        })
        .then(
          () => {
            call.end();
            finish(grpc.status.OK);
          },
          (err: unknown) => {
            // The client has gone: there is nobody to send a status to.
            if (cancelled) return finish(grpc.status.CANCELLED, 'CALL_CANCELLED');
            const status = failStream(call, err, log);
            finish(status.code, status.reason);
          },
        )
        .catch((err: unknown) => {
          try {
            log.error({ err, method: name }, 'rpc adapter failure');
          } catch {
            /* nothing left to report to */
          }
        });
    };
}
