import { AppError } from '../../src/shared/errors';
import { checkRequestStrings, findControlCharacter, protoFieldName } from '../../src/grpc/request-strings';

function refusal(request: unknown): { kind: string; reason: string; field?: string } | null {
  try {
    checkRequestStrings(request);
    return null;
  } catch (e) {
    const err = e as AppError;
    return { kind: err.kind, reason: err.reason, field: err.field };
  }
}

describe('checkRequestStrings (one rule for every request string)', () => {
  it('names a top-level field as in the proto', () => {
    expect(refusal({ userId: 1n, requestId: 'a\u0000b' })).toEqual({ kind: 'INVALID_ARGUMENT', reason: 'INVALID_CHARACTERS', field: 'request_id' });
  });

  it('names a nested field with a dotted path and a repeated one with its index', () => {
    expect(refusal({ amount: { currencyCode: 'US\u0000D', units: 1n, nanos: 0 } })?.field).toBe('amount.currency_code');
    expect(refusal({ items: [{ name: 'ok' }, { name: 'x\u001b' }] })?.field).toBe('items[1].name');
  });

  it.each([0x00, 0x01, 0x08, 0x0b, 0x0c, 0x0e, 0x1f, 0x7f, 0x80, 0x9f].map((code) => [code.toString(16).padStart(4, '0'), code]))(
    'refuses U+%s',
    (_hex, code) => {
      const c = String.fromCharCode(code as number);
      expect(findControlCharacter({ name: `a${c}` })).toEqual({ path: 'name', char: c });
    },
  );

  it('accepts tab, line feed, carriage return and all other text; ignores numbers, bigints, bytes and unset fields', () => {
    expect(
      refusal({
        reason: 'a\tb\nc\r\n',
        name: 'Zoë 🚀 \u00a0\u2028\ufeff',
        id: 5n,
        pageSize: 3,
        payload: Buffer.from([0, 1, 2]),
        amount: undefined,
        tags: [],
      }),
    ).toBeNull();
  });

  it('turns ts-proto names back into proto names', () => {
    expect(['email', 'requestId', 'currencyCode', 'pageToken', 'nextPageToken'].map(protoFieldName)).toEqual([
      'email',
      'request_id',
      'currency_code',
      'page_token',
      'next_page_token',
    ]);
  });
});
