/**
 * request_id idempotency (AIP-155). A key is stored in the same transaction
 * as the change it guards, with a hash of the request: the same id with the
 * same request replays, the same id with another request is REQUEST_ID_REUSED.
 */
import { createHash } from 'node:crypto';
import type { EntityManager } from '@mikro-orm/knex';
import { AppError, invalidArgument } from '../shared/errors';

export type IdempotencyScope = 'CreateUser' | 'AddFunds' | 'CreateBillingRecord';

export const MAX_REQUEST_ID_LENGTH = 128;

export function checkRequestId(requestId: string): string | null {
  if (requestId === '') return null;
  if (requestId.length > MAX_REQUEST_ID_LENGTH) {
    throw invalidArgument('request_id', 'INVALID_REQUEST_ID', `request_id must be at most ${MAX_REQUEST_ID_LENGTH} characters`);
  }
  return requestId;
}

export function requestHash(request: Record<string, string | number | bigint>): string {
  const canonical = Object.keys(request)
    .sort()
    .map((k) => `${k}=${String(request[k])}`)
    .join('\n');
  return createHash('sha256').update(canonical).digest('base64url');
}

/**
 * Claims the key for this transaction, or returns the id of the resource the
 * key already created. The claim is an insert-if-absent: a concurrent request
 * with the same key (another replica, say) waits on the unique index until this
 * transaction ends, then replays its result, or claims the key if it rolled
 * back. Returns null when the key is now claimed (finish with saveIdempotent).
 */
export async function findIdempotent(
  em: EntityManager,
  scope: IdempotencyScope,
  requestId: string,
  hash: string,
): Promise<number | null> {
  const claimed = await em.execute<{ affectedRows: number }>(
    `insert into idempotency_keys (scope, request_id, request_hash, resource_id, created_at) values (?, ?, ?, 0, 0)
     on conflict (scope, request_id) do nothing`,
    [scope, requestId, hash],
    'run',
  );
  if (claimed.affectedRows === 1) return null;
  const row = await em.execute<{ request_hash: string; resource_id: number | string }[]>(
    'select request_hash, resource_id from idempotency_keys where scope = ? and request_id = ?',
    [scope, requestId],
  );
  if (row[0].request_hash !== hash) {
    throw new AppError(
      'ALREADY_EXISTS',
      'REQUEST_ID_REUSED',
      `request_id ${JSON.stringify(requestId)} was already used for a different ${scope} request`,
    );
  }
  return Number(row[0].resource_id);
}

/** Records what the claimed key created, in the same transaction as the change. */
export async function saveIdempotent(
  em: EntityManager,
  scope: IdempotencyScope,
  requestId: string,
  _hash: string,
  resourceId: number,
  now: Date,
): Promise<void> {
  await em.execute(
    'update idempotency_keys set resource_id = ?, created_at = ? where scope = ? and request_id = ?',
    [resourceId, now.getTime(), scope, requestId],
    'run',
  );
}
