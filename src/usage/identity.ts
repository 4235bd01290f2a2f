/**
 * The identity of a usage entry, which makes ingestion exactly-once.
 *
 * - An entry with a producer `id` is `e:<id>`: the same id is the same usage,
 *   wherever and however often it appears.
 * - A valid entry without an id is `c:<hash of its content>:<n>`, where the
 *   content is (userId, service, exact quantity, timestamp instant) and n is
 *   its occurrence number among entries of the same content in the file, in
 *   file order. Reading a file again yields the same keys (nothing new is
 *   billed); appending entries yields new keys only for the new entries; two
 *   identical entries in one file are occurrences 1 and 2, two usages.
 * - A rejected entry is `r:<hash of its raw text>:<n>` by the same rule, so a
 *   rejection is recorded once, and a corrected entry is new usage.
 *
 * The occurrence number comes from the keys already stored (an entry whose
 * `:1` key is not stored is a first occurrence), so only identities that
 * repeat are counted in memory (see `keyed` in ingest.service.ts). This file
 * computes the hash part.
 */
import { createHash } from 'node:crypto';
import type { ValidUsage } from './validate';

export type IdentityKind = 'e' | 'c' | 'r';

const digest = (text: string): string => createHash('sha256').update(text).digest('base64url').slice(0, 22);

export function usageIdentity(usage: ValidUsage): { kind: IdentityKind; identity: string } {
  if (usage.eventId !== undefined) return { kind: 'e', identity: usage.eventId };
  const content = `${usage.userId}\n${usage.service}\n${usage.quantity}\n${usage.timestamp.getTime()}`;
  return { kind: 'c', identity: digest(content) };
}

export const rejectedIdentity = (raw: string): { kind: IdentityKind; identity: string } => ({ kind: 'r', identity: digest(raw) });
