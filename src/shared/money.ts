/**
 * All money and decimal arithmetic lives here. Amounts are integer micros
 * (1e-6 of the currency unit) held in `bigint`; floats never touch money.
 *
 * Rounding rule (the only one): a line amount is quantity x unit price,
 * computed exactly and rounded once to whole micros, half up (x.5 micro
 * rounds away from zero). Quantities and prices are never negative.
 */
import { invalidArgument } from './errors';

export const MICROS_PER_UNIT = 1_000_000n;
/** Decimal places of money (micros) and of usage quantities. */
export const MONEY_SCALE = 6;
export const QUANTITY_SCALE = 6;
/** Largest value a signed 64-bit column holds. */
export const INT64_MAX = 9_223_372_036_854_775_807n;

export class DecimalError extends Error {
  constructor(
    message: string,
    /** TOO_PRECISE, NEGATIVE, NOT_A_NUMBER or OUT_OF_RANGE. */
    readonly code: 'TOO_PRECISE' | 'NEGATIVE' | 'NOT_A_NUMBER' | 'OUT_OF_RANGE',
  ) {
    super(message);
  }
}

const DECIMAL_RE = /^([+-])?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?$/;
const DECIMAL_LEADING_DOT_RE = /^([+-])?()\.(\d+)(?:[eE]([+-]?\d+))?$/;

/**
 * Parses a decimal string ("12", "0.30", "-1.5", "1e3", "2.5E-3") exactly into
 * an integer scaled by 10^scale. Digits beyond `scale` must be zeros, else
 * TOO_PRECISE. Results outside the int64 range are OUT_OF_RANGE.
 */
export function parseDecimal(text: string, scale: number, opts: { allowNegative?: boolean } = {}): bigint {
  const m = DECIMAL_RE.exec(text) ?? DECIMAL_LEADING_DOT_RE.exec(text);
  if (!m) throw new DecimalError(`not a decimal number: ${JSON.stringify(truncate(text))}`, 'NOT_A_NUMBER');
  const [, sign, intPart, fracPart = '', expPart] = m;
  let digits = (intPart || '0') + fracPart;
  // Exponents of any length are valid JSON; clamp far beyond what any int64 needs (the sign is what matters then).
  const exp = expPart ? Math.max(-100_000, Math.min(100_000, Number(expPart.replace(/^([+-]?)0+(?=\d)/, '$1')))) : 0;
  // value = digits * 10^(exp - fracPart.length); we want value * 10^scale.
  let shift = exp - fracPart.length + scale;
  if (shift < 0) {
    const cut = -shift;
    const dropped = cut >= digits.length ? digits : digits.slice(digits.length - cut);
    if (/[^0]/.test(dropped)) {
      throw new DecimalError(`${truncate(text)} has more than ${scale} decimal places`, 'TOO_PRECISE');
    }
    digits = cut >= digits.length ? '0' : digits.slice(0, digits.length - cut);
    shift = 0;
  }
  digits = digits.replace(/^0+(?=\d)/, '');
  if (digits === '0') shift = 0;
  if (digits.length + shift > 19) {
    throw new DecimalError(`${truncate(text)} is out of range`, 'OUT_OF_RANGE');
  }
  let value = BigInt(digits) * 10n ** BigInt(shift);
  if (value > INT64_MAX) throw new DecimalError(`${truncate(text)} is out of range`, 'OUT_OF_RANGE');
  if (sign === '-' && value !== 0n) {
    if (!opts.allowNegative) throw new DecimalError(`${truncate(text)} is negative`, 'NEGATIVE');
    value = -value;
  }
  return value;
}

/** Formats an integer scaled by 10^scale as a decimal string with at least `minFraction` places. */
export function formatDecimal(value: bigint, scale: number, minFraction = 0): string {
  const negative = value < 0n;
  const abs = negative ? -value : value;
  const base = 10n ** BigInt(scale);
  const int = abs / base;
  let frac = scale > 0 ? (abs % base).toString().padStart(scale, '0') : '';
  frac = frac.replace(/0+$/, '');
  if (frac.length < minFraction) frac = frac.padEnd(minFraction, '0');
  return (negative ? '-' : '') + int.toString() + (frac ? '.' + frac : '');
}

/** "0.30" style: money as a decimal string of units, at least 2 places. */
export const formatMoney = (micros: bigint): string => formatDecimal(micros, MONEY_SCALE, 2);

/** Parses "12.34" (units) into micros; negative amounts are rejected. */
export const parseMoney = (text: string): bigint => parseDecimal(text.trim(), MONEY_SCALE);

/**
 * quantity (scaled by 10^QUANTITY_SCALE) x unit price (micros) -> micros,
 * rounded once, half up. Both inputs must be >= 0.
 */
export function lineAmount(quantityScaled: bigint, unitPriceMicros: bigint): bigint {
  if (quantityScaled < 0n || unitPriceMicros < 0n) throw new RangeError('lineAmount takes non-negative values');
  const divisor = 10n ** BigInt(QUANTITY_SCALE);
  const product = quantityScaled * unitPriceMicros;
  return (product + divisor / 2n) / divisor;
}

/** The protobuf Money message's shape (generated code is not imported here). */
export interface MoneyMessage {
  currencyCode: string;
  units: bigint;
  nanos: number;
}

/**
 * Money message -> micros. Rejects nanos outside +-999,999,999, nanos finer
 * than a micro, mixed signs, values outside int64 and another currency
 * (an empty currency_code means the deployment's currency).
 */
export function moneyToMicros(money: MoneyMessage | undefined, currency: string, field: string): bigint {
  if (!money) throw invalidArgument(field, 'MISSING_AMOUNT', `${field} is required`);
  const code = money.currencyCode.trim().toUpperCase();
  if (code !== '' && code !== currency) {
    throw invalidArgument(field, 'CURRENCY_MISMATCH', `${field} must be in ${currency}, got ${truncate(money.currencyCode)}`);
  }
  const { units, nanos } = money;
  if (!Number.isInteger(nanos) || nanos <= -1_000_000_000 || nanos >= 1_000_000_000) {
    throw invalidArgument(field, 'INVALID_AMOUNT', `${field}.nanos must be between -999999999 and 999999999`);
  }
  if ((units > 0n && nanos < 0) || (units < 0n && nanos > 0)) {
    throw invalidArgument(field, 'INVALID_AMOUNT', `${field}.units and ${field}.nanos must have the same sign`);
  }
  if (nanos % 1000 !== 0) {
    throw invalidArgument(field, 'AMOUNT_TOO_PRECISE', `${field} must be whole micros (nanos a multiple of 1000)`);
  }
  const micros = units * MICROS_PER_UNIT + BigInt(nanos / 1000);
  if (micros > INT64_MAX || micros < -INT64_MAX) {
    throw invalidArgument(field, 'AMOUNT_OUT_OF_RANGE', `${field} is out of range`);
  }
  return micros;
}

/** micros -> Money message in the given currency. */
export function microsToMoney(micros: bigint, currency: string): MoneyMessage {
  const units = micros / MICROS_PER_UNIT; // truncates toward zero: units and nanos share the sign
  const nanos = Number(micros % MICROS_PER_UNIT) * 1000;
  return { currencyCode: currency, units, nanos };
}

function truncate(text: string): string {
  return text.length > 40 ? text.slice(0, 40) + '…' : text;
}
