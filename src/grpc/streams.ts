/**
 * The first server interceptor: what each call may hold of the server, in
 * HTTP/2 streams and buffered request bytes, however the client behaves.
 *
 * grpc-js hands the FIRST interceptor its own call object, a
 * `BaseServerInterceptingCall` that keeps the call's `http2.ServerHttp2Stream`
 * in its `stream` field (node_modules/@grpc/grpc-js/build/src/server-interceptors.js,
 * `getServerInterceptingCall`). That field is not public API: it is looked up
 * defensively, and test/integration/flood.test.ts fails if a grpc-js upgrade
 * moves it. This interceptor must therefore stay first in the list.
 *
 * 1. Release. When grpc-js sends a status it ends its own side of the stream
 *    but, because it has a paused 'data' listener on it, Node keeps the stream
 *    until the client ends its side too (Node resets a server stream nobody
 *    reads by itself, but not this one). A client that never half-closes kept
 *    every refused call's stream: 40,000 cost ~270 MB. grpc-js reports every end
 *    of a call, by status or by the client going away, to the listener's
 *    onCancel, after the status has been handed to HTTP/2 (trailers-only: after
 *    `respond()`; otherwise in the 'wantTrailers' handler after `sendTrailers()`).
 *    There, a stream whose client has not finished sending is reset with
 *    RST_STREAM(NO_ERROR): RFC 9113 section 8.1 provides exactly this for a
 *    server that answers before the request is complete, and it is what Node
 *    itself does for an unread stream. The client has its status already; the
 *    stream is freed at once.
 * 2. Open services. Health and reflection need no token (./auth.ts), so anyone
 *    who can connect may call them and hold the call open. Per connection at
 *    most `maxOpenCallsPerConnection` of them run at once, and each request
 *    message may declare at most OPEN_REQUEST_MAX_BYTES (their requests are a
 *    service or symbol name); beyond either, RESOURCE_EXHAUSTED. Otherwise one
 *    connection could hold MAX_CONCURRENT_STREAMS calls, each buffering a
 *    half-sent message of up to MAX_RECEIVE_MESSAGE_BYTES.
 */
import * as http2 from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { AppError } from '../shared/errors';
import { methodOf, OPEN_SERVICES, serviceOf } from './auth';
import { describeError } from './status';

/** The largest request message an open-service call (health, reflection) may declare. */
export const OPEN_REQUEST_MAX_BYTES = 16 * 1024;

export const TOO_MANY_OPEN_CALLS = 'TOO_MANY_OPEN_CALLS';
export const REQUEST_TOO_LARGE = 'REQUEST_TOO_LARGE';

export interface StreamGuardDeps {
  log: Logger;
  /** Open-service calls (health, reflection) one connection may have running at once. */
  maxOpenCallsPerConnection: number;
  /** The server's MAX_RECEIVE_MESSAGE_BYTES; open-service requests get the smaller of it and 16 KiB. */
  maxReceiveMessageBytes: number;
}

/** The HTTP/2 stream under grpc-js's own call object, or null if grpc-js no longer keeps it there. */
export function streamOf(call: grpc.ServerInterceptingCallInterface): http2.ServerHttp2Stream | null {
  const stream = (call as unknown as { stream?: unknown }).stream;
  const looksRight =
    typeof stream === 'object' &&
    stream !== null &&
    typeof (stream as http2.ServerHttp2Stream).close === 'function' &&
    'rstCode' in stream &&
    'session' in stream;
  return looksRight ? (stream as http2.ServerHttp2Stream) : null;
}

/** How long a reset waits for the status (trailers after response messages) to leave, at most. */
const RELEASE_WAIT_MS = 1000;

/**
 * Resets the stream with NO_ERROR unless it is gone already or the client has
 * finished sending. RFC 9113 allows this only after the complete response: a
 * trailers-only status has left once handed over, but trailers after response
 * messages (a stream's answers) leave after the queued data, and a reset
 * submitted meanwhile reached the client first (it saw "RST_STREAM with code 0"
 * instead of the status). So the reset waits until our end of the stream is
 * closed (END_STREAM sent), for up to RELEASE_WAIT_MS.
 */
function release(stream: http2.ServerHttp2Stream, waitedMs = 0): void {
  if (stream.destroyed || stream.closed) return;
  if (stream.state.remoteClose) return; // the stream closes by itself once our end is sent
  if (stream.headersSent && !stream.state.localClose && waitedMs < RELEASE_WAIT_MS) {
    setTimeout(() => release(stream, waitedMs + 5), 5).unref();
    return;
  }
  stream.close(http2.constants.NGHTTP2_NO_ERROR);
}

/**
 * Follows the gRPC framing of a request body (1 flag byte, 4-byte big-endian
 * length, then the message) and reports the first declared length over the
 * limit, before the message is buffered.
 */
export function frameLengthWatcher(limit: number, onTooLarge: (declared: number) => void): (chunk: Buffer) => void {
  const prefix = Buffer.alloc(5);
  let prefixFill = 0;
  let bodyLeft = 0;
  let done = false;
  return (chunk) => {
    let at = 0;
    while (!done && at < chunk.length) {
      if (bodyLeft > 0) {
        const n = Math.min(bodyLeft, chunk.length - at);
        bodyLeft -= n;
        at += n;
        continue;
      }
      const n = Math.min(5 - prefixFill, chunk.length - at);
      chunk.copy(prefix, prefixFill, at, at + n);
      prefixFill += n;
      at += n;
      if (prefixFill === 5) {
        prefixFill = 0;
        bodyLeft = prefix.readUInt32BE(1);
        if (bodyLeft > limit) {
          done = true;
          onTooLarge(bodyLeft);
        }
      }
    }
  };
}

export function createStreamGuard(deps: StreamGuardDeps): grpc.ServerInterceptor {
  const { log, maxOpenCallsPerConnection } = deps;
  const requestLimit = Math.min(OPEN_REQUEST_MAX_BYTES, deps.maxReceiveMessageBytes);
  // Open-service calls running per connection; an entry goes with its session.
  const openCalls = new WeakMap<http2.Http2Session, number>();
  let warned = false;

  return (method, call) => {
    const stream = streamOf(call);
    if (stream === null) {
      if (!warned) {
        warned = true;
        log.error('grpc-js no longer exposes the HTTP/2 stream to the first interceptor: streams are not released early');
      }
      return new grpc.ServerInterceptingCall(call);
    }
    const open = OPEN_SERVICES.has(serviceOf(method.path));
    const session = stream.session;
    let counted = false;

    const refuse = (error: AppError) => {
      const status = describeError(error, log);
      call.sendStatus({ code: status.code, details: status.details, metadata: status.metadata });
      log.info({ method: methodOf(method.path), code: grpc.status[status.code], reason: status.reason, peer: call.getPeer() }, 'rpc');
    };

    return new grpc.ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, admit) => {
            if (open && session) {
              const running = openCalls.get(session) ?? 0;
              if (running >= maxOpenCallsPerConnection) {
                refuse(
                  new AppError(
                    'RESOURCE_EXHAUSTED',
                    TOO_MANY_OPEN_CALLS,
                    `at most ${maxOpenCallsPerConnection} health or reflection calls at once per connection`,
                  ),
                );
                return;
              }
              openCalls.set(session, running + 1);
              counted = true;
              // Prepended, so that it sees each chunk before grpc-js buffers it.
              stream.prependListener(
                'data',
                frameLengthWatcher(requestLimit, (declared) =>
                  refuse(
                    new AppError(
                      'RESOURCE_EXHAUSTED',
                      REQUEST_TOO_LARGE,
                      `a health or reflection request may be at most ${requestLimit} bytes, not ${declared}`,
                    ),
                  ),
                ),
              );
            }
            admit(metadata);
          },
          onCancel: () => {
            if (counted && session) {
              counted = false;
              const left = (openCalls.get(session) ?? 1) - 1;
              if (left > 0) openCalls.set(session, left);
              else openCalls.delete(session);
            }
            release(stream);
          },
        }),
    });
  };
}
