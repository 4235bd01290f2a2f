import fc from 'fast-check';
import { JsonNumber, type JsonValue, type RawEntry } from '../../src/usage/parser';
import { type RejectReason, type Validation, validateEntry } from '../../src/usage/entries';

const NOW = new Date('2024-06-01T12:00:00Z');
const SKEW = 5 * 60_000;

const num = (text: string): JsonNumber => new JsonNumber(text);

function entryOf(value: JsonValue | undefined, extra: Partial<RawEntry> = {}): RawEntry {
  return { ordinal: 0, line: 1, raw: '', ...(value === undefined ? {} : { value }), ...extra };
}

const base = (): Record<string, JsonValue> => ({
  userId: num('42'),
  service: 'api-calls',
  quantity: num('1000'),
  timestamp: '2024-01-15T10:00:00Z',
});

function check(fields: Record<string, JsonValue | undefined>, now = NOW, skew = SKEW): Validation {
  const value = { ...base(), ...fields };
  for (const k of Object.keys(value)) if (value[k] === undefined) delete value[k];
  return validateEntry(entryOf(value as Record<string, JsonValue>), now, skew);
}

function accepted(fields: Record<string, JsonValue | undefined>, now = NOW, skew = SKEW) {
  const v = check(fields, now, skew);
  if (!v.ok) throw new Error(`expected acceptance, got ${v.reason}: ${v.message}`);
  return v.usage;
}

function rejected(fields: Record<string, JsonValue | undefined>, now = NOW, skew = SKEW): { reason: RejectReason; message: string } {
  const v = check(fields, now, skew);
  if (v.ok) throw new Error(`expected a rejection, got ${JSON.stringify(v.usage, (_k, x) => (typeof x === 'bigint' ? `${x}n` : x))}`);
  return { reason: v.reason, message: v.message };
}

describe('validateEntry: a typical entry', () => {
  it('accepts a typical entry and returns exact values', () => {
    expect(accepted({})).toEqual({
      userId: 42,
      service: 'api-calls',
      quantity: 1_000_000_000n,
      quantityText: '1000',
      timestamp: new Date('2024-01-15T10:00:00Z'),
    });
  });

  it('ignores unknown extra keys', () => {
    expect(accepted({ extra: 'x', nested: { a: [num('1')] } }).userId).toBe(42);
  });

  it('does not set eventId when there is no id', () => {
    expect('eventId' in accepted({})).toBe(false);
  });
});

describe('validateEntry: every reject reason', () => {
  it.each<[RejectReason, RawEntry]>([
    ['INVALID_JSON', { ordinal: 0, line: 1, raw: '{x', error: "unexpected character 'x' at column 2, expected a string key" }],
    ['INVALID_JSON', { ordinal: 0, line: 1, raw: '' }],
    ['NOT_AN_OBJECT', entryOf([base()])],
    ['NOT_AN_OBJECT', entryOf(num('1'))],
    ['NOT_AN_OBJECT', entryOf('text')],
    ['NOT_AN_OBJECT', entryOf(null)],
    ['NOT_AN_OBJECT', entryOf(true)],
  ])('rejects with %s', (reason, entry) => {
    const v = validateEntry(entry, NOW, SKEW);
    expect(v).toMatchObject({ ok: false, reason });
  });

  it('includes the line error in the INVALID_JSON message', () => {
    const v = validateEntry(entryOf(undefined, { error: 'unexpected end of line at column 7' }), NOW, SKEW);
    expect(v).toEqual({ ok: false, reason: 'INVALID_JSON', message: 'the entry is not valid JSON: unexpected end of line at column 7' });
  });

  it.each<[string, Record<string, JsonValue | undefined>, RejectReason]>([
    ['a missing userId', { userId: undefined }, 'INVALID_USER_ID'],
    ['userId 0', { userId: num('0') }, 'INVALID_USER_ID'],
    ['a negative userId', { userId: num('-5') }, 'INVALID_USER_ID'],
    ['a fractional userId', { userId: num('1.5') }, 'INVALID_USER_ID'],
    ['a userId of 1e-1', { userId: num('1e-1') }, 'INVALID_USER_ID'],
    ['a userId above MAX_SAFE_INTEGER', { userId: num('9007199254740992') }, 'INVALID_USER_ID'],
    ['a huge userId', { userId: num('1e400') }, 'INVALID_USER_ID'],
    ['a userId string with spaces', { userId: ' 42' }, 'INVALID_USER_ID'],
    ['a userId string with a trailing space', { userId: '42 ' }, 'INVALID_USER_ID'],
    ['a userId string with a sign', { userId: '+42' }, 'INVALID_USER_ID'],
    ['a userId string "0"', { userId: '0' }, 'INVALID_USER_ID'],
    ['an empty userId string', { userId: '' }, 'INVALID_USER_ID'],
    ['a fractional userId string', { userId: '4.2' }, 'INVALID_USER_ID'],
    ['a userId string above MAX_SAFE_INTEGER', { userId: '9007199254740992' }, 'INVALID_USER_ID'],
    ['a boolean userId', { userId: true }, 'INVALID_USER_ID'],
    ['a null userId', { userId: null }, 'INVALID_USER_ID'],
    ['an object userId', { userId: { id: num('1') } }, 'INVALID_USER_ID'],
    ['a missing service', { service: undefined }, 'MISSING_SERVICE'],
    ['a null service', { service: null }, 'MISSING_SERVICE'],
    ['an empty service', { service: '' }, 'INVALID_SERVICE'],
    ['a blank service', { service: '   ' }, 'INVALID_SERVICE'],
    ['a numeric service', { service: num('5') }, 'INVALID_SERVICE'],
    ['a service of 101 characters', { service: 'x'.repeat(101) }, 'INVALID_SERVICE'],
    ['a service with a NUL character', { service: 'api\u0000calls' }, 'INVALID_SERVICE'],
    ['an invalid resource', { service: undefined, resource: [] }, 'INVALID_SERVICE'],
    ['service and resource that differ', { resource: 'storage' }, 'CONFLICTING_SERVICE'],
    ['a missing quantity', { quantity: undefined }, 'INVALID_QUANTITY'],
    ['a boolean quantity', { quantity: false }, 'INVALID_QUANTITY'],
    ['a null quantity', { quantity: null }, 'INVALID_QUANTITY'],
    ['a non-numeric quantity string', { quantity: 'ten' }, 'INVALID_QUANTITY'],
    ['a quantity string with spaces', { quantity: ' 10' }, 'INVALID_QUANTITY'],
    ['an empty quantity string', { quantity: '' }, 'INVALID_QUANTITY'],
    ['a hexadecimal quantity string', { quantity: '0x10' }, 'INVALID_QUANTITY'],
    ['a negative quantity', { quantity: num('-1') }, 'NEGATIVE_QUANTITY'],
    ['a negative quantity string', { quantity: '-0.5' }, 'NEGATIVE_QUANTITY'],
    ['a quantity with 7 decimals', { quantity: num('0.0000001') }, 'QUANTITY_TOO_PRECISE'],
    ['a quantity string with 7 decimals', { quantity: '1.1234567' }, 'QUANTITY_TOO_PRECISE'],
    ['a quantity of 1e-7', { quantity: num('1e-7') }, 'QUANTITY_TOO_PRECISE'],
    ['a quantity above 1e12', { quantity: num('1000000000000.000001') }, 'QUANTITY_OUT_OF_RANGE'],
    ['a quantity of 1e13', { quantity: num('1e13') }, 'QUANTITY_OUT_OF_RANGE'],
    ['a quantity beyond int64', { quantity: num('12345678901234567890.123456') }, 'QUANTITY_OUT_OF_RANGE'],
    ['a quantity with a 5-digit exponent', { quantity: num('1e10000') }, 'QUANTITY_OUT_OF_RANGE'],
    ['a quantity with a 5-digit negative exponent', { quantity: num('1e-10000') }, 'QUANTITY_TOO_PRECISE'],
    ['a missing timestamp', { timestamp: undefined }, 'INVALID_TIMESTAMP'],
    ['a numeric timestamp', { timestamp: num('1705312800000') }, 'INVALID_TIMESTAMP'],
    ['a date-only timestamp', { timestamp: '2024-01-15' }, 'INVALID_TIMESTAMP'],
    ['a timestamp without a timezone', { timestamp: '2024-01-15T10:00:00' }, 'INVALID_TIMESTAMP'],
    ['an impossible date', { timestamp: '2024-02-30T10:00:00Z' }, 'INVALID_TIMESTAMP'],
    ['February 29 of a non-leap year', { timestamp: '2023-02-29T10:00:00Z' }, 'INVALID_TIMESTAMP'],
    ['hour 24', { timestamp: '2024-01-15T24:00:00Z' }, 'INVALID_TIMESTAMP'],
    ['minute 60', { timestamp: '2024-01-15T10:60:00Z' }, 'INVALID_TIMESTAMP'],
    ['month 13', { timestamp: '2024-13-01T10:00:00Z' }, 'INVALID_TIMESTAMP'],
    ['an offset of +24:00', { timestamp: '2024-01-15T10:00:00+24:00' }, 'INVALID_TIMESTAMP'],
    ['an offset without a colon', { timestamp: '2024-01-15T10:00:00+0200' }, 'INVALID_TIMESTAMP'],
    ['free text', { timestamp: 'yesterday' }, 'INVALID_TIMESTAMP'],
    ['a timestamp before 2000', { timestamp: '1999-12-31T23:59:59Z' }, 'INVALID_TIMESTAMP'],
    ['a timestamp in the future', { timestamp: '2024-06-01T12:05:00.001Z' }, 'FUTURE_TIMESTAMP'],
    ['a boolean id', { id: true }, 'INVALID_ID'],
    ['a null id', { id: null }, 'INVALID_ID'],
    ['an empty id', { id: '' }, 'INVALID_ID'],
    ['an id of 201 characters', { id: 'i'.repeat(201) }, 'INVALID_ID'],
    ['a fractional id', { id: num('1.5') }, 'INVALID_ID'],
    ['an object id', { id: { a: 'b' } }, 'INVALID_ID'],
  ])('rejects %s', (_name, fields, reason) => {
    const { reason: got, message } = rejected(fields);
    expect(got).toBe(reason);
    expect(message.length).toBeGreaterThan(0);
    expect(message.length).toBeLessThan(200);
  });

  it('names the field in the message', () => {
    expect(rejected({ userId: 'abc' }).message).toMatch(/userId/);
    expect(rejected({ service: 5 as unknown as JsonValue }).message).toMatch(/service/);
    expect(rejected({ quantity: 'ten' }).message).toMatch(/quantity/);
    expect(rejected({ timestamp: 'x' }).message).toMatch(/timestamp/);
    expect(rejected({ id: true }).message).toMatch(/id/);
    expect(rejected({ resource: 'other' }).message).toMatch(/service.*resource/);
  });

  it('keeps messages short even for huge values', () => {
    expect(rejected({ quantity: 'x'.repeat(100_000) }).message.length).toBeLessThan(200);
    expect(rejected({ userId: '9'.repeat(100_000) }).message.length).toBeLessThan(200);
  });
});

describe('validateEntry: accepted variants', () => {
  it('accepts a userId given as a string of digits', () => {
    expect(accepted({ userId: '42' }).userId).toBe(42);
    expect(accepted({ userId: '9007199254740991' }).userId).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('accepts a userId written with a fraction or exponent that is an exact integer', () => {
    expect(accepted({ userId: num('1e0') }).userId).toBe(1);
    expect(accepted({ userId: num('4.2e1') }).userId).toBe(42);
    expect(accepted({ userId: num('42.000') }).userId).toBe(42);
    expect(accepted({ userId: num('9007199254740991') }).userId).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('accepts the "resource" synonym of "service"', () => {
    expect(accepted({ service: undefined, resource: 'storage' }).service).toBe('storage');
  });

  it('accepts service and resource when they agree (after trimming)', () => {
    expect(accepted({ service: 'api', resource: ' api ' }).service).toBe('api');
  });

  it('uses resource when service is null', () => {
    expect(accepted({ service: null, resource: 'storage' }).service).toBe('storage');
  });

  it('stores the service trimmed and allows exactly 100 characters', () => {
    expect(accepted({ service: '  api-calls\t' }).service).toBe('api-calls');
    expect(accepted({ service: 'x'.repeat(100) }).service).toHaveLength(100);
    expect(accepted({ service: '😀'.repeat(100) }).service).toBe('😀'.repeat(100));
  });

  it('accepts a quantity given as a decimal string', () => {
    const u = accepted({ quantity: '12.5' });
    expect([u.quantity, u.quantityText]).toEqual([12_500_000n, '12.5']);
  });

  it('accepts a quantity written with an exponent', () => {
    expect(accepted({ quantity: num('1e3') }).quantity).toBe(1_000_000_000n);
    expect(accepted({ quantity: num('2.5E-3') }).quantity).toBe(2_500n);
    expect(accepted({ quantity: num('1E+2') }).quantity).toBe(100_000_000n);
    expect(accepted({ quantity: num('1e00003') }).quantity).toBe(1_000_000_000n);
    expect(accepted({ quantity: num('0e99999') }).quantity).toBe(0n);
  });

  it('keeps quantities exact', () => {
    expect(accepted({ quantity: '0.000001' }).quantity).toBe(1n);
    expect(accepted({ quantity: num('0.000001') }).quantity).toBe(1n);
    expect(accepted({ quantity: num('1000') }).quantity).toBe(1_000_000_000n);
    expect(accepted({ quantity: num('0.1') }).quantity).toBe(100_000n);
    expect(accepted({ quantity: num('999999999999.999999') }).quantity).toBe(999_999_999_999_999_999n);
    expect(accepted({ quantity: num('0.50000000') }).quantityText).toBe('0.5');
    expect(accepted({ quantity: num('0') }).quantityText).toBe('0');
    expect(accepted({ quantity: num('-0') }).quantity).toBe(0n);
  });

  it('accepts exactly 1e12 units', () => {
    const u = accepted({ quantity: num('1000000000000') });
    expect([u.quantity, u.quantityText]).toEqual([10n ** 18n, '1000000000000']);
  });

  it('accepts RFC 3339 timestamps with Z, offsets and fractions', () => {
    expect(accepted({ timestamp: '2024-01-15T10:00:00.123+02:00' }).timestamp.toISOString()).toBe('2024-01-15T08:00:00.123Z');
    expect(accepted({ timestamp: '2024-01-15T10:00:00-05:30' }).timestamp.toISOString()).toBe('2024-01-15T15:30:00.000Z');
    expect(accepted({ timestamp: '2024-02-29T00:00:00z' }).timestamp.toISOString()).toBe('2024-02-29T00:00:00.000Z');
    expect(accepted({ timestamp: '2024-01-15T10:00:00.123456789Z' }).timestamp.toISOString()).toBe('2024-01-15T10:00:00.123Z');
    expect(accepted({ timestamp: '2000-01-01T00:00:00Z' }).timestamp.getTime()).toBe(Date.UTC(2000, 0, 1));
  });

  it('applies the offset before checking the year-2000 limit', () => {
    expect(accepted({ timestamp: '1999-12-31T23:00:00-01:00' }).timestamp.toISOString()).toBe('2000-01-01T00:00:00.000Z');
    expect(rejected({ timestamp: '2000-01-01T00:30:00+01:00' }).reason).toBe('INVALID_TIMESTAMP');
  });

  it('accepts an id given as a string or as an integer', () => {
    expect(accepted({ id: 'evt-1' }).eventId).toBe('evt-1');
    expect(accepted({ id: num('12345678901234567890') }).eventId).toBe('12345678901234567890');
    expect(accepted({ id: 'i'.repeat(200) }).eventId).toHaveLength(200);
  });
});

describe('validateEntry: future skew boundary', () => {
  it('accepts a timestamp exactly at now + maxFutureSkewMs and rejects one a millisecond later', () => {
    const limit = new Date(NOW.getTime() + SKEW).toISOString();
    const later = new Date(NOW.getTime() + SKEW + 1).toISOString();
    expect(accepted({ timestamp: limit }).timestamp.toISOString()).toBe(limit);
    expect(rejected({ timestamp: later }).reason).toBe('FUTURE_TIMESTAMP');
  });

  it('rejects any future timestamp with a zero skew', () => {
    expect(accepted({ timestamp: NOW.toISOString() }, NOW, 0).timestamp).toEqual(NOW);
    expect(rejected({ timestamp: '2024-06-01T12:00:00.001Z' }, NOW, 0).reason).toBe('FUTURE_TIMESTAMP');
  });

  it('compares instants, not wall-clock text, for offset timestamps', () => {
    // 14:05+02:00 is 12:05Z: exactly at the limit.
    expect(accepted({ timestamp: '2024-06-01T14:05:00+02:00' }).timestamp.toISOString()).toBe('2024-06-01T12:05:00.000Z');
    expect(rejected({ timestamp: '2024-06-01T14:05:01+02:00' }).reason).toBe('FUTURE_TIMESTAMP');
  });
});

describe('validateEntry: never throws', () => {
  /** The message of validateEntry's last-resort catch: no input should reach it. */
  const INTERNAL_FALLBACK = 'the entry could not be read';

  /** A fast-check JSON value as a parser JsonValue (numbers become JsonNumber). */
  function toJsonValue(v: unknown): JsonValue {
    if (typeof v === 'number') return new JsonNumber(JSON.stringify(v));
    if (Array.isArray(v)) return v.map(toJsonValue);
    if (v !== null && typeof v === 'object') {
      const out: Record<string, JsonValue> = {};
      for (const [k, x] of Object.entries(v)) {
        Object.defineProperty(out, k, { value: toJsonValue(x), enumerable: true, writable: true, configurable: true });
      }
      return out;
    }
    return v as JsonValue;
  }

  const numberText = fc.oneof(
    fc.constantFrom('0', '-0', '1', '1e0', '1e3', '1E+2', '1e-7', '1e99999', '0.000001', '1.5', '-1', '9007199254740993', '1e00003'),
    fc.double().filter(Number.isFinite).map((d) => JSON.stringify(d)),
    fc.bigInt().map((b) => b.toString()),
    fc.string({ unit: 'binary', maxLength: 10 }),
  );
  const fieldValue: fc.Arbitrary<JsonValue> = fc.oneof(
    numberText.map((t) => new JsonNumber(t)),
    numberText,
    fc.constantFrom(
      '2024-01-15T10:00:00Z',
      '2024-02-30T10:00:00Z',
      '9999-12-31T23:59:59+23:59',
      '0000-01-01T00:00:00Z',
      '2024-01-15T10:00:00.9999999999Z',
      'api-calls',
      ' ',
      '',
    ),
    fc.string({ unit: 'binary', maxLength: 30 }),
    fc.jsonValue({ maxDepth: 2 }).map(toJsonValue),
  );
  const usageLike = fc.record(
    {
      userId: fieldValue,
      service: fieldValue,
      resource: fieldValue,
      quantity: fieldValue,
      timestamp: fieldValue,
      id: fieldValue,
    },
    { requiredKeys: [] },
  );

  it('never throws for arbitrary JSON values', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        const result = validateEntry(entryOf(toJsonValue(v)), NOW, SKEW);
        expect(typeof result.ok).toBe('boolean');
        if (!result.ok) expect(result.message).not.toBe(INTERNAL_FALLBACK);
      }),
      { numRuns: 1000 },
    );
  });

  it('never throws for arbitrary usage-like objects, and accepted ones satisfy the invariants', () => {
    fc.assert(
      fc.property(usageLike, fc.integer({ min: 0, max: 10 ** 12 }), (fields, skew) => {
        const result = validateEntry(entryOf(fields as Record<string, JsonValue>), NOW, skew);
        if (result.ok) {
          const u = result.usage;
          expect(Number.isSafeInteger(u.userId) && u.userId > 0).toBe(true);
          expect(u.service.length).toBeGreaterThan(0);
          expect(u.service).toBe(u.service.trim());
          expect(u.quantity >= 0n && u.quantity <= 10n ** 18n).toBe(true);
          expect(u.timestamp.getTime()).toBeGreaterThanOrEqual(Date.UTC(2000, 0, 1));
          expect(u.timestamp.getTime()).toBeLessThanOrEqual(NOW.getTime() + skew);
        } else {
          expect(result.message.length).toBeGreaterThan(0);
          expect(result.message).not.toBe(INTERNAL_FALLBACK);
        }
      }),
      { numRuns: 3000 },
    );
  });

  it('never throws for arbitrary JavaScript values in place of an entry value', () => {
    fc.assert(
      fc.property(fc.anything(), fc.anything(), (v, error) => {
        for (const entry of [
          entryOf(v as JsonValue),
          { ordinal: 0, line: 1, raw: '', error } as RawEntry,
          entryOf({ ...base(), userId: v as JsonValue, quantity: v as JsonValue, id: v as JsonValue }),
          entryOf({ ...base(), service: v as JsonValue, timestamp: v as JsonValue }),
        ]) {
          const result = validateEntry(entry, NOW, SKEW);
          if (!result.ok) expect(result.message).not.toBe(INTERNAL_FALLBACK);
        }
      }),
      { numRuns: 500 },
    );
  });
});
