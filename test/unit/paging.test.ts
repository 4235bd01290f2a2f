import { AppError } from '../../src/shared/errors';
import { DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, pageOf, readPage } from '../../src/shared/paging';

interface Row {
  id: number;
}

const rows = (...ids: number[]): Row[] => ids.map((id) => ({ id }));

/** kind / reason / field of the AppError `fn` throws. */
function appErrorOf(fn: () => unknown): { kind: string; reason: string; field: string | undefined } {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  if (thrown === undefined) throw new Error('expected the call to throw, it returned normally');
  expect(thrown).toBeInstanceOf(AppError);
  const err = thrown as AppError;
  return { kind: err.kind, reason: err.reason, field: err.field };
}

const INVALID_TOKEN = { kind: 'INVALID_ARGUMENT', reason: 'INVALID_PAGE_TOKEN', field: 'page_token' };

/** Decodes a token, applies `edit`, re-encodes it. */
function tamper(token: string, edit: (t: Record<string, unknown>) => void): string {
  const t = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as Record<string, unknown>;
  edit(t);
  return Buffer.from(JSON.stringify(t)).toString('base64url');
}

/** A token issued after row id 2 for `filter`, with page size 2. */
function tokenAfter2(filter: unknown): string {
  const page = readPage({ pageSize: 2, pageToken: '' }, filter);
  const { nextPageToken } = pageOf(rows(1, 2, 3), page);
  expect(nextPageToken).not.toBe('');
  return nextPageToken;
}

describe('readPage page size', () => {
  it('uses 50 when page_size is 0 and fetches one extra row', () => {
    const page = readPage({ pageSize: 0, pageToken: '' }, {});
    expect(DEFAULT_PAGE_SIZE).toBe(50);
    expect(page.size).toBe(50);
    expect(page.limit).toBe(51);
    expect(page.afterId).toBe(0);
  });

  it('keeps a page_size within the cap', () => {
    expect(readPage({ pageSize: 1, pageToken: '' }, {}).size).toBe(1);
    expect(readPage({ pageSize: 120, pageToken: '' }, {}).size).toBe(120);
    expect(readPage({ pageSize: 500, pageToken: '' }, {}).size).toBe(500);
  });

  it('caps page_size at 500', () => {
    expect(MAX_PAGE_SIZE).toBe(500);
    const page = readPage({ pageSize: 501, pageToken: '' }, {});
    expect(page.size).toBe(500);
    expect(page.limit).toBe(501);
    expect(readPage({ pageSize: 1_000_000, pageToken: '' }, {}).size).toBe(500);
  });

  it.each([-1, -500, 2.5, Number.NaN])('rejects page_size %p with INVALID_ARGUMENT / INVALID_PAGE_SIZE', (pageSize) => {
    expect(appErrorOf(() => readPage({ pageSize, pageToken: '' }, {}))).toEqual({
      kind: 'INVALID_ARGUMENT',
      reason: 'INVALID_PAGE_SIZE',
      field: 'page_size',
    });
  });
});

describe('pageOf / readPage tokens', () => {
  it('returns the page and a token that resumes after its last id', () => {
    const filter = { userId: 7, status: 'PENDING' };
    const first = readPage({ pageSize: 2, pageToken: '' }, filter);
    const out = pageOf(rows(10, 20, 30), first);
    expect(out.items).toEqual(rows(10, 20));
    expect(out.nextPageToken).not.toBe('');

    const second = readPage({ pageSize: 2, pageToken: out.nextPageToken }, filter);
    expect(second.afterId).toBe(20);
    expect(second.size).toBe(2);
  });

  it("returns '' as the next token when no extra row was fetched", () => {
    const page = readPage({ pageSize: 2, pageToken: '' }, {});
    expect(pageOf(rows(1, 2), page)).toEqual({ items: rows(1, 2), nextPageToken: '' });
    expect(pageOf(rows(1), page)).toEqual({ items: rows(1), nextPageToken: '' });
    expect(pageOf([], page)).toEqual({ items: [], nextPageToken: '' });
  });

  it('walks a whole table page by page, every row once, ending with an empty token', () => {
    const table = rows(2, 3, 5, 8, 13, 21, 34);
    const filter = { userId: 1 };
    const seen: number[] = [];
    let token = '';
    let pages = 0;
    do {
      const page = readPage({ pageSize: 3, pageToken: token }, filter);
      const fetched = table.filter((r) => r.id > page.afterId).slice(0, page.limit);
      const out = pageOf(fetched, page);
      seen.push(...out.items.map((r) => r.id));
      token = out.nextPageToken;
      pages++;
    } while (token !== '' && pages < 10);
    expect(seen).toEqual([2, 3, 5, 8, 13, 21, 34]);
    expect(pages).toBe(3);
  });

  it('accepts a token with a different page size on the next request', () => {
    const token = tokenAfter2({ userId: 1 });
    const page = readPage({ pageSize: 10, pageToken: token }, { userId: 1 });
    expect(page.afterId).toBe(2);
    expect(page.size).toBe(10);
  });

  it.each(['garbage', '!!!', 'e30', Buffer.from('null').toString('base64url'), Buffer.from('[1,2]').toString('base64url')])(
    'rejects the malformed token %j with INVALID_PAGE_TOKEN',
    (pageToken) => {
      expect(appErrorOf(() => readPage({ pageSize: 2, pageToken }, { userId: 1 }))).toEqual(INVALID_TOKEN);
    },
  );

  it.each<[string, unknown]>([
    ['a negative id', -1],
    ['a non-integer id', 2.5],
    ['a string id', '2'],
    ['an unsafe integer id', 2 ** 60],
  ])('rejects a token carrying %s with INVALID_PAGE_TOKEN', (_what, a) => {
    const token = tamper(tokenAfter2({ userId: 1 }), (t) => {
      t.a = a;
    });
    expect(appErrorOf(() => readPage({ pageSize: 2, pageToken: token }, { userId: 1 }))).toEqual(INVALID_TOKEN);
  });

  it('rejects a token without its filter fingerprint', () => {
    const token = tamper(tokenAfter2({ userId: 1 }), (t) => {
      delete t.f;
    });
    expect(appErrorOf(() => readPage({ pageSize: 2, pageToken: token }, { userId: 1 }))).toEqual(INVALID_TOKEN);
  });

  it('rejects a token reused with another filter with INVALID_PAGE_TOKEN', () => {
    const token = tokenAfter2({ userId: 1 });
    expect(appErrorOf(() => readPage({ pageSize: 2, pageToken: token }, { userId: 2 }))).toEqual(INVALID_TOKEN);
    expect(appErrorOf(() => readPage({ pageSize: 2, pageToken: token }, { userId: 1, status: 'FAILED' }))).toEqual(
      INVALID_TOKEN,
    );
    // the same filter still works
    expect(readPage({ pageSize: 2, pageToken: token }, { userId: 1 }).afterId).toBe(2);
  });
});
