import { invalidArgument } from './errors';

/**
 * int64 ids arrive as bigint from the wire; rows use JS numbers (ids stay far
 * below 2^53). An id of 0 or below, or beyond 2^53, names nothing that exists.
 */
export function toId(value: bigint, field: string): number {
  if (value <= 0n || value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw invalidArgument(field, 'INVALID_ID', `${field} must be a positive id`);
  }
  return Number(value);
}
