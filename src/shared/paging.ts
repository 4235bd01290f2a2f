/**
 * Opaque page tokens (AIP-158): base64url of the last id returned and a
 * fingerprint of the filter, so a token cannot be replayed with another
 * filter. Page sizes: default 50, at most 500, negative is an error.
 */
import { createHash } from 'node:crypto';
import { invalidArgument } from './errors';

export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 500;

export interface PageRequest {
  pageSize: number;
  pageToken: string;
}

export interface Page {
  /** Rows to fetch: the page size plus one, to know whether more follow. */
  limit: number;
  size: number;
  /** Return rows with id greater than this. */
  afterId: number;
  filter: string;
}

function fingerprint(filter: unknown): string {
  return createHash('sha256').update(JSON.stringify(filter)).digest('base64url').slice(0, 12);
}

/** A request's page_size: `defaultSize` for 0, at most MAX_PAGE_SIZE; INVALID_ARGUMENT when negative. */
export function pageSizeOf(requested: number, defaultSize = DEFAULT_PAGE_SIZE): number {
  if (!Number.isInteger(requested) || requested < 0) {
    throw invalidArgument('page_size', 'INVALID_PAGE_SIZE', 'page_size must not be negative');
  }
  return requested === 0 ? defaultSize : Math.min(requested, MAX_PAGE_SIZE);
}

export function readPage(req: PageRequest, filter: unknown): Page {
  const size = pageSizeOf(req.pageSize);
  const fp = fingerprint(filter);
  let afterId = 0;
  if (req.pageToken !== '') {
    let parsed: unknown;
    try {
      parsed = JSON.parse(Buffer.from(req.pageToken, 'base64url').toString('utf8'));
    } catch {
      parsed = undefined;
    }
    const token = parsed as { a?: unknown; f?: unknown } | undefined;
    if (!token || typeof token.a !== 'number' || !Number.isSafeInteger(token.a) || token.a < 0 || typeof token.f !== 'string') {
      throw invalidArgument('page_token', 'INVALID_PAGE_TOKEN', 'page_token is not valid');
    }
    if (token.f !== fp) {
      throw invalidArgument('page_token', 'INVALID_PAGE_TOKEN', 'page_token was issued for another filter');
    }
    afterId = token.a;
  }
  return { limit: size + 1, size, afterId, filter: fp };
}

/** Cuts the extra row and returns the next token ('' at the end). */
export function pageOf<T extends { id: number }>(rows: T[], page: Page): { items: T[]; nextPageToken: string } {
  if (rows.length <= page.size) return { items: rows, nextPageToken: '' };
  const items = rows.slice(0, page.size);
  const last = items[items.length - 1].id;
  const nextPageToken = Buffer.from(JSON.stringify({ a: last, f: page.filter })).toString('base64url');
  return { items, nextPageToken };
}
