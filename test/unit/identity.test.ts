import { JsonNumber, type JsonValue } from '../../src/usage/parser';
import { rejectedIdentity, usageIdentity } from '../../src/usage/entries';
import { type ValidUsage, validateEntry } from '../../src/usage/entries';

const base: ValidUsage = {
  userId: 42,
  service: 'api-calls',
  quantity: 1_500_000n,
  quantityText: '1.5',
  timestamp: new Date('2024-01-15T10:00:00.000Z'),
};

const usage = (changes: Partial<ValidUsage> = {}): ValidUsage => ({ ...base, ...changes });

/** Validates a usage-log object as the ingest job would; fails the test if it is rejected. */
function validUsage(value: { [key: string]: JsonValue }): ValidUsage {
  const v = validateEntry({ ordinal: 0, line: 1, raw: JSON.stringify(value), value }, new Date('2025-01-01T00:00:00Z'), 0);
  if (!v.ok) throw new Error(`expected a valid entry, got ${v.reason}: ${v.message}`);
  return v.usage;
}

describe('usageIdentity', () => {
  it('uses the producer event id when there is one', () => {
    expect(usageIdentity(usage({ eventId: 'evt-1' }))).toEqual({ kind: 'e', identity: 'evt-1' });
  });

  it('keeps the event id key whatever the content', () => {
    const a = usageIdentity(usage({ eventId: 'evt-1' }));
    const b = usageIdentity(usage({ eventId: 'evt-1', userId: 7, service: 'storage', quantity: 9n, timestamp: new Date(0) }));
    expect(b).toEqual(a);
  });

  it('gives the same content under different event ids different keys', () => {
    expect(usageIdentity(usage({ eventId: 'evt-1' })).identity).not.toBe(usageIdentity(usage({ eventId: 'evt-2' })).identity);
  });

  it('gives an entry without an id a content key, equal for equal content', () => {
    const a = usageIdentity(usage());
    const b = usageIdentity({ ...base, timestamp: new Date(base.timestamp.getTime()) });
    expect(a.kind).toBe('c');
    expect(a.identity).not.toBe('');
    expect(b).toEqual(a);
  });

  it.each<[string, Partial<ValidUsage>]>([
    ['userId', { userId: 43 }],
    ['service', { service: 'storage' }],
    ['service case', { service: 'API-calls' }],
    ['quantity by one millionth', { quantity: 1_500_001n }],
    ['quantity', { quantity: 15_000_000n }],
    ['timestamp by one millisecond', { timestamp: new Date('2024-01-15T10:00:00.001Z') }],
    ['timestamp by a day', { timestamp: new Date('2024-01-16T10:00:00.000Z') }],
  ])('changes the content key when %s changes', (_what, changes) => {
    const a = usageIdentity(usage());
    const b = usageIdentity(usage(changes));
    expect(b.kind).toBe('c');
    expect(b.identity).not.toBe(a.identity);
  });

  it('does not confuse fields across the separator (userId 1 + service "2x" vs userId 12 + service "x")', () => {
    const a = usageIdentity(usage({ userId: 1, service: '2x' }));
    const b = usageIdentity(usage({ userId: 12, service: 'x' }));
    expect(a.identity).not.toBe(b.identity);
  });

  it('gives the same key to the same instant written with different offsets', () => {
    const texts = ['2024-01-15T10:00:00Z', '2024-01-15T12:00:00+02:00', '2024-01-15T04:30:00-05:30', '2024-01-15T10:00:00.000+00:00'];
    const keys = texts.map((timestamp) =>
      usageIdentity(validUsage({ userId: new JsonNumber('42'), service: 'api-calls', quantity: new JsonNumber('1.5'), timestamp })),
    );
    expect(keys[0]).toEqual(usageIdentity(usage()));
    for (const k of keys) expect(k).toEqual(keys[0]);
  });

  it('gives the same key to the same quantity written differently', () => {
    const key = (quantity: JsonValue) =>
      usageIdentity(validUsage({ userId: new JsonNumber('42'), service: 'api-calls', quantity, timestamp: '2024-01-15T10:00:00Z' }));
    expect(key(new JsonNumber('1.50'))).toEqual(key(new JsonNumber('1.5')));
    expect(key(new JsonNumber('15e-1'))).toEqual(key(new JsonNumber('1.5')));
    expect(key('1.5')).toEqual(key(new JsonNumber('1.5')));
  });
});

describe('rejectedIdentity', () => {
  it('is a rejection key equal for equal raw text', () => {
    const a = rejectedIdentity('{"userId":"x"}');
    expect(a.kind).toBe('r');
    expect(a.identity).not.toBe('');
    expect(rejectedIdentity('{"userId":"x"}')).toEqual(a);
  });

  it('differs when the raw text differs, even only in whitespace', () => {
    expect(rejectedIdentity('{"userId":"x"}').identity).not.toBe(rejectedIdentity('{"userId": "x"}').identity);
    expect(rejectedIdentity('{"userId":"x"}').identity).not.toBe(rejectedIdentity('{"userId":"y"}').identity);
    expect(rejectedIdentity('').identity).not.toBe(rejectedIdentity(' ').identity);
  });
});
