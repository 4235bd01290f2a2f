/**
 * The one table from thrown errors to gRPC statuses.
 *
 * An `AppError` keeps its message (written for clients) and its reason. A
 * transient database error becomes UNAVAILABLE. Anything else becomes
 * INTERNAL with the fixed message "internal error": the original error and its
 * stack go to the log only, so no SQL, path or stack trace reaches a client.
 *
 * The machine-readable reason travels three ways: at the end of the status
 * message ("user 999 not found [USER_NOT_FOUND]", for people), and for programs:
 * - trailers `billing-error-reason` (and `billing-error-field` when a request
 *   field is at fault);
 * - `grpc-status-details-bin`: a serialized google.rpc.Status whose one detail
 *   is a google.rpc.ErrorInfo { reason, domain: "billing.v1", metadata }.
 */
import * as grpc from '@grpc/grpc-js';
import { BinaryWriter, WireType } from '@bufbuild/protobuf/wire';
import type { Logger } from 'pino';
import { isTransientDbError } from '../db/errors';
import { AppError, type ErrorKind } from '../shared/errors';

export const ERROR_DOMAIN = 'billing.v1';
export const REASON_KEY = 'billing-error-reason';
export const FIELD_KEY = 'billing-error-field';
export const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
export const ERROR_INFO_TYPE_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

export const INTERNAL_MESSAGE = 'internal error';
export const INTERNAL_REASON = 'INTERNAL';
export const DATABASE_UNAVAILABLE_REASON = 'DATABASE_UNAVAILABLE';
const DATABASE_UNAVAILABLE_MESSAGE = 'the database is unavailable; try again';

/** AppError.kind -> gRPC status code. */
export const STATUS_BY_KIND: Readonly<Record<ErrorKind, grpc.status>> = Object.freeze({
  INVALID_ARGUMENT: grpc.status.INVALID_ARGUMENT,
  NOT_FOUND: grpc.status.NOT_FOUND,
  ALREADY_EXISTS: grpc.status.ALREADY_EXISTS,
  FAILED_PRECONDITION: grpc.status.FAILED_PRECONDITION,
  ABORTED: grpc.status.ABORTED,
  UNAVAILABLE: grpc.status.UNAVAILABLE,
  RESOURCE_EXHAUSTED: grpc.status.RESOURCE_EXHAUSTED,
  OUT_OF_RANGE: grpc.status.OUT_OF_RANGE,
  UNAUTHENTICATED: grpc.status.UNAUTHENTICATED,
  PERMISSION_DENIED: grpc.status.PERMISSION_DENIED,
  CANCELLED: grpc.status.CANCELLED,
});

/** What a failed call reports: the status plus the reason, for logging. */
export interface ErrorStatus {
  code: grpc.status;
  details: string;
  metadata: grpc.Metadata;
  reason: string;
}

/** google.rpc.ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; } */
function encodeErrorInfo(reason: string, metadata: Record<string, string>): Uint8Array {
  const w = new BinaryWriter();
  w.tag(1, WireType.LengthDelimited).string(reason);
  w.tag(2, WireType.LengthDelimited).string(ERROR_DOMAIN);
  for (const [key, value] of Object.entries(metadata)) {
    // A map entry is a nested message { key = 1; value = 2; }.
    w.tag(3, WireType.LengthDelimited).fork();
    w.tag(1, WireType.LengthDelimited).string(key);
    w.tag(2, WireType.LengthDelimited).string(value);
    w.join();
  }
  return w.finish();
}

/**
 * google.rpc.Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
 * with one Any { string type_url = 1; bytes value = 2; } holding the ErrorInfo.
 */
export function encodeStatusDetails(code: grpc.status, message: string, reason: string, metadata: Record<string, string>): Buffer {
  const w = new BinaryWriter();
  w.tag(1, WireType.Varint).int32(code);
  w.tag(2, WireType.LengthDelimited).string(message);
  w.tag(3, WireType.LengthDelimited).fork();
  w.tag(1, WireType.LengthDelimited).string(ERROR_INFO_TYPE_URL);
  w.tag(2, WireType.LengthDelimited).bytes(encodeErrorInfo(reason, metadata));
  w.join();
  return Buffer.from(w.finish());
}

/**
 * The status message: the error's message, then its reason in brackets
 * ("user 999 not found [USER_NOT_FOUND]"), so that the reason shows where only
 * the message does (`buf curl` prints the ErrorInfo detail as base64). INTERNAL
 * stays exactly "internal error".
 */
export function statusMessage(message: string, reason: string): string {
  return reason === INTERNAL_REASON ? message : `${message} [${reason}]`;
}

function statusOf(code: grpc.status, message: string, reason: string, field?: string): ErrorStatus {
  const details = statusMessage(message, reason);
  const metadata = new grpc.Metadata();
  metadata.set(REASON_KEY, reason);
  const info: Record<string, string> = {};
  if (field) {
    metadata.set(FIELD_KEY, field);
    info.field = field;
  }
  metadata.set(STATUS_DETAILS_KEY, encodeStatusDetails(code, details, reason, info));
  return { code, details, metadata, reason };
}

/** Maps any thrown value to the status sent to the client, logging what the client must not see. */
export function describeError(err: unknown, log: Logger): ErrorStatus {
  if (err instanceof AppError) {
    return statusOf(STATUS_BY_KIND[err.kind], err.message, err.reason, err.field);
  }
  if (isTransientDbError(err)) {
    log.warn({ err }, 'database unavailable');
    return statusOf(grpc.status.UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE, DATABASE_UNAVAILABLE_REASON);
  }
  log.error({ err }, 'unexpected error');
  return statusOf(grpc.status.INTERNAL, INTERNAL_MESSAGE, INTERNAL_REASON);
}

/** The status object for a grpc-js callback: code, details and trailers. */
export function toServiceError(err: unknown, log: Logger): Partial<grpc.StatusObject> {
  const { code, details, metadata } = describeError(err, log);
  return { code, details, metadata };
}
