/**
 * Domain errors. Services throw exactly one kind of error, `AppError`, and the
 * gRPC adapter maps its `kind` to a status code in one table
 * (src/grpc/status.ts). Domain code never imports gRPC.
 */
export type ErrorKind =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'FAILED_PRECONDITION'
  | 'ABORTED'
  | 'UNAVAILABLE'
  | 'RESOURCE_EXHAUSTED'
  | 'OUT_OF_RANGE'
  | 'UNAUTHENTICATED'
  | 'PERMISSION_DENIED'
  | 'CANCELLED';

export class AppError extends Error {
  override readonly name = 'AppError';
  constructor(
    readonly kind: ErrorKind,
    /** Stable machine-readable reason, e.g. INSUFFICIENT_FUNDS. */
    readonly reason: string,
    message: string,
    /** The request field at fault, for INVALID_ARGUMENT. */
    readonly field?: string,
  ) {
    super(message);
  }
}

export const invalidArgument = (field: string, reason: string, message: string): AppError =>
  new AppError('INVALID_ARGUMENT', reason, message, field);

export const notFound = (reason: string, message: string): AppError => new AppError('NOT_FOUND', reason, message);

export const failedPrecondition = (reason: string, message: string): AppError =>
  new AppError('FAILED_PRECONDITION', reason, message);

export const alreadyExists = (reason: string, message: string): AppError =>
  new AppError('ALREADY_EXISTS', reason, message);
