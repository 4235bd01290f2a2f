import fc from 'fast-check';
import { AppError } from '../../src/shared/errors';
import {
  DecimalError,
  INT64_MAX,
  type MoneyMessage,
  formatDecimal,
  formatMoney,
  lineAmount,
  microsToMoney,
  moneyToMicros,
  parseDecimal,
  parseMoney,
} from '../../src/shared/money';

/** Runs `fn`, which must throw, and returns what it threw. */
function thrownBy(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new Error('expected the call to throw, it returned normally');
}

/** The DecimalError code `parseDecimal(text, scale, opts)` fails with. */
function decimalCode(text: string, scale = 6, opts?: { allowNegative?: boolean }): string {
  const e = thrownBy(() => parseDecimal(text, scale, opts));
  expect(e).toBeInstanceOf(DecimalError);
  return (e as DecimalError).code;
}

/** kind / reason / field of the AppError `fn` throws. */
function appErrorOf(fn: () => unknown): { kind: string; reason: string; field: string | undefined } {
  const e = thrownBy(fn);
  expect(e).toBeInstanceOf(AppError);
  const err = e as AppError;
  return { kind: err.kind, reason: err.reason, field: err.field };
}

const usd = (units: bigint, nanos: number, currencyCode = 'USD'): MoneyMessage => ({ currencyCode, units, nanos });

describe('parseDecimal', () => {
  it.each([
    ['0', 0n],
    ['7', 7_000_000n],
    ['12', 12_000_000n],
    ['+3', 3_000_000n],
    ['007', 7_000_000n],
  ])('parses the integer %j at scale 6 as %s', (text, expected) => {
    expect(parseDecimal(text, 6)).toBe(expected);
  });

  it.each([
    ['0.30', 300_000n],
    ['12.5', 12_500_000n],
    ['0.000001', 1n],
    ['1.234567', 1_234_567n],
    ['.5', 500_000n],
    ['+.25', 250_000n],
  ])('parses the fraction %j at scale 6 as %s', (text, expected) => {
    expect(parseDecimal(text, 6)).toBe(expected);
  });

  it.each([
    ['1e3', 1_000_000_000n],
    ['1E3', 1_000_000_000n],
    ['2.5E-3', 2_500n],
    ['1e-6', 1n],
    ['100e-8', 1n],
    ['1.5e+2', 150_000_000n],
    ['.5e1', 5_000_000n],
  ])('parses the exponent form %j at scale 6 as %s', (text, expected) => {
    expect(parseDecimal(text, 6)).toBe(expected);
  });

  it('scales by the requested number of places', () => {
    expect(parseDecimal('12.5', 2)).toBe(1250n);
    expect(parseDecimal('12', 0)).toBe(12n);
    expect(parseDecimal('1e3', 0)).toBe(1000n);
  });

  it('accepts zeros beyond the scale ("1.5000000" at scale 6)', () => {
    expect(parseDecimal('1.5000000', 6)).toBe(1_500_000n);
    expect(parseDecimal('2.000000000000', 6)).toBe(2_000_000n);
    expect(parseDecimal('12.00', 0)).toBe(12n);
  });

  it.each([
    ['0.0000001', 6],
    ['1.0000001', 6],
    ['1.5e-7', 6],
    ['5e-7', 6],
    ['0.5e-6', 6],
    ['1e-9999', 6],
    ['12.5', 0],
    ['0.125', 2],
  ])('rejects %j at scale %i as TOO_PRECISE', (text, scale) => {
    expect(decimalCode(text, scale)).toBe('TOO_PRECISE');
  });

  it('rejects a negative number as NEGATIVE unless allowNegative is set', () => {
    expect(decimalCode('-1.5')).toBe('NEGATIVE');
    expect(decimalCode('-0.000001')).toBe('NEGATIVE');
    expect(parseDecimal('-1.5', 6, { allowNegative: true })).toBe(-1_500_000n);
    expect(parseDecimal('-.5', 6, { allowNegative: true })).toBe(-500_000n);
    expect(parseDecimal('-2.5E-3', 6, { allowNegative: true })).toBe(-2_500n);
  });

  it.each(['', ' 1', '1 ', '1.', '.', '-', 'abc', '0x10', 'NaN', 'Infinity', '-Infinity', '1e', 'e3', '1,5', '1..5', '--1', '1e1.5'])(
    'rejects %j as NOT_A_NUMBER',
    (text) => {
      expect(decimalCode(text)).toBe('NOT_A_NUMBER');
    },
  );

  it('accepts exactly int64 max', () => {
    expect(parseDecimal('9223372036854775807', 0)).toBe(INT64_MAX);
    expect(parseDecimal('9223372036854.775807', 6)).toBe(INT64_MAX);
    expect(parseDecimal('9.223372036854775807e18', 0)).toBe(INT64_MAX);
  });

  it('rejects values just above int64 max as OUT_OF_RANGE', () => {
    expect(decimalCode('9223372036854775808', 0)).toBe('OUT_OF_RANGE');
    expect(decimalCode('9223372036854.775808', 6)).toBe('OUT_OF_RANGE');
    expect(decimalCode('9999999999999999999', 0)).toBe('OUT_OF_RANGE');
    expect(decimalCode('1e19', 0)).toBe('OUT_OF_RANGE');
    expect(decimalCode('1e13', 6)).toBe('OUT_OF_RANGE');
    expect(decimalCode('1e9999', 6)).toBe('OUT_OF_RANGE');
  });

  it('parses "0e9999" and other huge-exponent zeros as 0', () => {
    expect(parseDecimal('0e9999', 6)).toBe(0n);
    expect(parseDecimal('0.000e9999', 6)).toBe(0n);
    expect(parseDecimal('0e-9999', 6)).toBe(0n);
  });

  it('parses a decimal string built from random integer and fraction digits exactly', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: 10n ** 12n }), fc.bigInt({ min: 0n, max: 999_999n }), (units, micros) => {
        const text = `${units}.${micros.toString().padStart(6, '0')}`;
        expect(parseDecimal(text, 6)).toBe(units * 1_000_000n + micros);
      }),
    );
  });
});

describe('formatDecimal / formatMoney', () => {
  it('formats 300000 micros as money "0.30"', () => {
    expect(formatMoney(300_000n)).toBe('0.30');
  });

  it('formats money with at least two places and no trailing zeros beyond them', () => {
    expect(formatMoney(12_500_000n)).toBe('12.50');
    expect(formatMoney(0n)).toBe('0.00');
    expect(formatMoney(1n)).toBe('0.000001');
    expect(formatMoney(1_234_567n)).toBe('1.234567');
    expect(formatMoney(7_000_000n)).toBe('7.00');
    expect(formatMoney(-1_500_000n)).toBe('-1.50');
  });

  it('formats negatives with a leading minus ("-1.5")', () => {
    expect(formatDecimal(-1_500_000n, 6)).toBe('-1.5');
    expect(formatDecimal(-1n, 6)).toBe('-0.000001');
    expect(formatDecimal(-12_000_000n, 6)).toBe('-12');
  });

  it('drops trailing zeros when minFraction is 0 and pads to minFraction otherwise', () => {
    expect(formatDecimal(12_500_000n, 6)).toBe('12.5');
    expect(formatDecimal(12_000_000n, 6)).toBe('12');
    expect(formatDecimal(0n, 6)).toBe('0');
    expect(formatDecimal(12_500_000n, 6, 3)).toBe('12.500');
    expect(formatDecimal(12_000_000n, 6, 1)).toBe('12.0');
    expect(formatDecimal(1_234_567n, 6, 2)).toBe('1.234567');
  });

  it('formats at scale 0 and scale 2', () => {
    expect(formatDecimal(1234n, 0)).toBe('1234');
    expect(formatDecimal(1234n, 2)).toBe('12.34');
    expect(formatDecimal(5n, 2)).toBe('0.05');
  });

  it('round-trips formatDecimal then parseDecimal at scale 6 for any value in [0, 10^18]', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: 10n ** 18n }), (x) => {
        expect(parseDecimal(formatDecimal(x, 6), 6)).toBe(x);
        expect(parseDecimal(formatMoney(x), 6)).toBe(x);
      }),
    );
  });
});

describe('parseMoney', () => {
  it('parses units into micros', () => {
    expect(parseMoney('12.34')).toBe(12_340_000n);
    expect(parseMoney('0.01')).toBe(10_000n);
    expect(parseMoney('100')).toBe(100_000_000n);
  });

  it('ignores surrounding whitespace', () => {
    expect(parseMoney('  0.30 ')).toBe(300_000n);
  });

  it('rejects negatives and sub-micro amounts', () => {
    expect((thrownBy(() => parseMoney('-1')) as DecimalError).code).toBe('NEGATIVE');
    expect((thrownBy(() => parseMoney('0.0000001')) as DecimalError).code).toBe('TOO_PRECISE');
    expect((thrownBy(() => parseMoney('ten')) as DecimalError).code).toBe('NOT_A_NUMBER');
  });

  it('adds 0.1 and 0.2 to exactly 0.30', () => {
    const sum = parseMoney('0.1') + parseMoney('0.2');
    expect(formatMoney(sum)).toBe('0.30');
    expect(sum).toBe(parseMoney('0.3'));
    expect(sum).toBe(300_000n);
  });
});

describe('lineAmount', () => {
  it('multiplies exactly when the product is whole micros', () => {
    // 1000 units x 0.01 = 10.00
    expect(lineAmount(1_000_000_000n, 10_000n)).toBe(10_000_000n);
    // 2.5 units x 0.02 = 0.05
    expect(lineAmount(2_500_000n, 20_000n)).toBe(50_000n);
    // 1 unit x 0.10 = 0.10
    expect(lineAmount(1_000_000n, 100_000n)).toBe(100_000n);
    // 0.000001 units x 1000000 = 1.00
    expect(lineAmount(1n, 1_000_000_000_000n)).toBe(1_000_000n);
  });

  it('rounds exactly half a micro up', () => {
    // 0.000001 units x 0.5 = 0.5 micro -> 1
    expect(lineAmount(1n, 500_000n)).toBe(1n);
    // 0.000003 units x 0.5 = 1.5 micros -> 2
    expect(lineAmount(3n, 500_000n)).toBe(2n);
    // 0.5 units x 0.000005 = 2.5 micros -> 3
    expect(lineAmount(500_000n, 5n)).toBe(3n);
  });

  it('rounds just below half a micro down and just above up', () => {
    // 0.499999 micro -> 0
    expect(lineAmount(1n, 499_999n)).toBe(0n);
    // 0.500001 micro -> 1
    expect(lineAmount(1n, 500_001n)).toBe(1n);
    // 2.499999 micros -> 2, 2.500001 micros -> 3
    expect(lineAmount(2_499_999n, 1n)).toBe(2n);
    expect(lineAmount(2_500_001n, 1n)).toBe(3n);
  });

  it('is zero when either factor is zero', () => {
    expect(lineAmount(0n, 10_000n)).toBe(0n);
    expect(lineAmount(1_000_000n, 0n)).toBe(0n);
    expect(lineAmount(0n, 0n)).toBe(0n);
  });

  it('throws a RangeError on a negative quantity or price', () => {
    expect(() => lineAmount(-1n, 10_000n)).toThrow(RangeError);
    expect(() => lineAmount(1_000_000n, -1n)).toThrow(RangeError);
  });

  it('equals an independent half-up reference for q in [0, 10^15], p in [0, 10^9]', () => {
    // floor(q*p / 10^6 + 1/2) written as one integer division.
    const reference = (q: bigint, p: bigint): bigint => (2n * q * p + 10n ** 6n) / (2n * 10n ** 6n);
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: 10n ** 15n }), fc.bigInt({ min: 0n, max: 10n ** 9n }), (q, p) => {
        expect(lineAmount(q, p)).toBe(reference(q, p));
      }),
    );
  });
});

describe('moneyToMicros', () => {
  it('converts units and nanos to micros', () => {
    expect(moneyToMicros(usd(12n, 340_000_000), 'USD', 'amount')).toBe(12_340_000n);
    expect(moneyToMicros(usd(0n, 1_000), 'USD', 'amount')).toBe(1n);
    expect(moneyToMicros(usd(0n, 0), 'USD', 'amount')).toBe(0n);
    expect(moneyToMicros(usd(-1n, -500_000_000), 'USD', 'amount')).toBe(-1_500_000n);
    expect(moneyToMicros(usd(0n, -500_000_000), 'USD', 'amount')).toBe(-500_000n);
  });

  it('treats an empty currency code as the deployment currency', () => {
    expect(moneyToMicros(usd(5n, 0, ''), 'USD', 'amount')).toBe(5_000_000n);
    expect(moneyToMicros(usd(5n, 0, ''), 'EUR', 'amount')).toBe(5_000_000n);
  });

  it('matches the currency code case-insensitively', () => {
    expect(moneyToMicros(usd(5n, 0, 'usd'), 'USD', 'amount')).toBe(5_000_000n);
    expect(moneyToMicros(usd(5n, 0, 'Usd'), 'USD', 'amount')).toBe(5_000_000n);
  });

  it('rejects another currency with INVALID_ARGUMENT / CURRENCY_MISMATCH on the named field', () => {
    expect(appErrorOf(() => moneyToMicros(usd(5n, 0, 'EUR'), 'USD', 'top_up.amount'))).toEqual({
      kind: 'INVALID_ARGUMENT',
      reason: 'CURRENCY_MISMATCH',
      field: 'top_up.amount',
    });
  });

  it('rejects nanos that are not whole micros with AMOUNT_TOO_PRECISE', () => {
    for (const nanos of [1, 999, 1_500, -1_500, 999_999_999]) {
      expect(appErrorOf(() => moneyToMicros(usd(nanos < 0 ? -1n : 1n, nanos), 'USD', 'amount'))).toEqual({
        kind: 'INVALID_ARGUMENT',
        reason: 'AMOUNT_TOO_PRECISE',
        field: 'amount',
      });
    }
  });

  it('rejects units and nanos of opposite signs with INVALID_AMOUNT', () => {
    const expected = { kind: 'INVALID_ARGUMENT', reason: 'INVALID_AMOUNT', field: 'price' };
    expect(appErrorOf(() => moneyToMicros(usd(1n, -500_000_000), 'USD', 'price'))).toEqual(expected);
    expect(appErrorOf(() => moneyToMicros(usd(-1n, 500_000_000), 'USD', 'price'))).toEqual(expected);
  });

  it('rejects nanos outside +-999,999,999 or not an integer with INVALID_AMOUNT', () => {
    const expected = { kind: 'INVALID_ARGUMENT', reason: 'INVALID_AMOUNT', field: 'price' };
    for (const nanos of [1_000_000_000, -1_000_000_000, 2_000_000_000, 1_500.5, Number.NaN]) {
      expect(appErrorOf(() => moneyToMicros(usd(0n, nanos), 'USD', 'price'))).toEqual(expected);
    }
  });

  it('rejects a missing amount with MISSING_AMOUNT on the named field', () => {
    expect(appErrorOf(() => moneyToMicros(undefined, 'USD', 'amount'))).toEqual({
      kind: 'INVALID_ARGUMENT',
      reason: 'MISSING_AMOUNT',
      field: 'amount',
    });
  });

  it('rejects amounts outside int64 micros with AMOUNT_OUT_OF_RANGE', () => {
    const expected = { kind: 'INVALID_ARGUMENT', reason: 'AMOUNT_OUT_OF_RANGE', field: 'amount' };
    expect(appErrorOf(() => moneyToMicros(usd(9_223_372_036_855n, 0), 'USD', 'amount'))).toEqual(expected);
    expect(appErrorOf(() => moneyToMicros(usd(-9_223_372_036_855n, 0), 'USD', 'amount'))).toEqual(expected);
    // the largest representable amount is accepted
    expect(moneyToMicros(usd(9_223_372_036_854n, 775_807_000), 'USD', 'amount')).toBe(INT64_MAX);
  });
});

describe('microsToMoney', () => {
  it('splits positive micros into units and nanos', () => {
    expect(microsToMoney(12_340_000n, 'USD')).toEqual({ currencyCode: 'USD', units: 12n, nanos: 340_000_000 });
    expect(microsToMoney(1n, 'EUR')).toEqual({ currencyCode: 'EUR', units: 0n, nanos: 1_000 });
  });

  it('gives units and nanos the same sign for negative micros', () => {
    expect(microsToMoney(-1_500_000n, 'USD')).toEqual({ currencyCode: 'USD', units: -1n, nanos: -500_000_000 });
    expect(microsToMoney(-1n, 'USD')).toEqual({ currencyCode: 'USD', units: 0n, nanos: -1_000 });
    expect(microsToMoney(-2_000_000n, 'USD')).toEqual({ currencyCode: 'USD', units: -2n, nanos: 0 });
  });

  it('gives zero units and zero nanos for zero', () => {
    const m = microsToMoney(0n, 'USD');
    expect(m).toEqual({ currencyCode: 'USD', units: 0n, nanos: 0 });
    expect(Object.is(m.nanos, 0)).toBe(true);
  });

  it('always yields a valid Money (nanos a multiple of 1000, in range, same sign) that round-trips through moneyToMicros', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: -(10n ** 18n), max: 10n ** 18n }), (x) => {
        const m = microsToMoney(x, 'USD');
        expect(Math.abs(m.nanos) % 1000).toBe(0);
        expect(Math.abs(m.nanos)).toBeLessThan(1_000_000_000);
        expect(m.units > 0n && m.nanos < 0).toBe(false);
        expect(m.units < 0n && m.nanos > 0).toBe(false);
        expect(m.units * 1_000_000_000n + BigInt(m.nanos)).toBe(x * 1000n);
        expect(moneyToMicros(m, 'USD', 'amount')).toBe(x);
      }),
    );
  });
});
