/**
 * The door of the `idempotency_keys` table: request_id idempotency (AIP-155).
 * A key is claimed in the same transaction as the change it guards, with a
 * hash of the request: the same id with the same request replays, the same id
 * with another request is REQUEST_ID_REUSED.
 */
import { createHash } from 'node:crypto';
import { AppError, invalidArgument } from '../shared/errors';
import type { Tx } from './database';

export type IdempotencyScope = 'CreateUser' | 'AddFunds' | 'CreateBillingRecord';

export const MAX_REQUEST_ID_LENGTH = 128;

/** A request's key: its scope, its request_id and the hash of what it asks. */
export interface IdempotencyKey {
  scope: IdempotencyScope;
  requestId: string;
  hash: string;
}

export interface IdempotencyKeys {
  /** The key of a request, or null without a request_id; INVALID_ARGUMENT for a request_id too long. */
  key(scope: IdempotencyScope, requestId: string, request: Record<string, string | number | bigint>): IdempotencyKey | null;
  /**
   * Claims the key in `tx`, or returns the id of the resource it already
   * created. The claim is an insert-if-absent: a concurrent request with the
   * same key (on another replica, say) waits on the unique index until this
   * transaction ends, then replays its result, or claims the key if it rolled
   * back. Null: the key is now claimed (finish with complete).
   */
  claim(tx: Tx, key: IdempotencyKey): Promise<number | null>;
  /** Records what the claimed key created, in the same transaction as the change. */
  complete(tx: Tx, key: IdempotencyKey, resourceId: number, now: Date): Promise<void>;
}

export function requestHash(request: Record<string, string | number | bigint>): string {
  const canonical = Object.keys(request)
    .sort()
    .map((k) => `${k}=${String(request[k])}`)
    .join('\n');
  return createHash('sha256').update(canonical).digest('base64url');
}

export function createIdempotencyKeys(): IdempotencyKeys {
  return {
    key(scope, requestId, request) {
      if (requestId === '') return null;
      if (requestId.length > MAX_REQUEST_ID_LENGTH) {
        throw invalidArgument('request_id', 'INVALID_REQUEST_ID', `request_id must be at most ${MAX_REQUEST_ID_LENGTH} characters`);
      }
      return { scope, requestId, hash: requestHash(request) };
    },

    async claim(tx, { scope, requestId, hash }) {
      const claimed = await tx.run(
        `insert into idempotency_keys (scope, request_id, request_hash, resource_id, created_at) values (?, ?, ?, 0, 0)
         on conflict (scope, request_id) do nothing`,
        [scope, requestId, hash],
        { keep: true },
      );
      if (claimed === 1) return null;
      const [row] = await tx.all<{ request_hash: string; resource_id: number | string }>(
        'select request_hash, resource_id from idempotency_keys where scope = ? and request_id = ?',
        [scope, requestId],
        { keep: true },
      );
      if (row.request_hash !== hash) {
        throw new AppError(
          'ALREADY_EXISTS',
          'REQUEST_ID_REUSED',
          `request_id ${JSON.stringify(requestId)} was already used for a different ${scope} request`,
        );
      }
      return Number(row.resource_id);
    },

    async complete(tx, { scope, requestId }, resourceId, now) {
      await tx.run(
        'update idempotency_keys set resource_id = ?, created_at = ? where scope = ? and request_id = ?',
        [resourceId, now.getTime(), scope, requestId],
        { keep: true },
      );
    },
  };
}
