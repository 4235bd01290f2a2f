/**
 * A usage entry, from what the parser read to what ingestion stores: its
 * validation (a valid usage or a rejection reason; pure and total, never
 * throws whatever the entry holds) and its identity, which makes ingestion
 * exactly-once.
 *
 * Identity:
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
 * repeat are counted in memory (./occurrence-table.ts, used by ./ingest.ts).
 * This file computes the hash part.
 */
import { createHash } from 'node:crypto';
import { DecimalError, QUANTITY_SCALE, formatDecimal, parseDecimal } from '../shared/money';
import { JsonNumber, type JsonValue, type RawEntry } from './parser';

export interface ValidUsage {
  /** Positive safe integer. */
  userId: number;
  /** Trimmed, 1..100 characters. */
  service: string;
  /** Exact quantity scaled by 10^QUANTITY_SCALE. */
  quantity: bigint;
  /** Canonical decimal text of the quantity, e.g. "1000", "0.5". */
  quantityText: string;
  timestamp: Date;
  /** The producer's optional "id". */
  eventId?: string;
}

export type RejectReason =
  | 'INVALID_JSON'
  | 'NOT_AN_OBJECT'
  | 'INVALID_USER_ID'
  | 'MISSING_SERVICE'
  | 'INVALID_SERVICE'
  | 'CONFLICTING_SERVICE'
  | 'INVALID_QUANTITY'
  | 'NEGATIVE_QUANTITY'
  | 'QUANTITY_TOO_PRECISE'
  | 'QUANTITY_OUT_OF_RANGE'
  | 'INVALID_TIMESTAMP'
  | 'FUTURE_TIMESTAMP'
  | 'INVALID_ID';

export type Validation = { ok: true; usage: ValidUsage } | { ok: false; reason: RejectReason; message: string };

export const MAX_SERVICE_CHARS = 100;
export const MAX_EVENT_ID_CHARS = 200;
/** Largest accepted quantity: 10^12 units, scaled. */
export const MAX_QUANTITY_SCALED = 10n ** BigInt(12 + QUANTITY_SCALE);
/** Earliest accepted timestamp. */
export const MIN_TIMESTAMP_MS = Date.UTC(2000, 0, 1);

type Obj = { [key: string]: JsonValue };

class Reject {
  constructor(
    readonly reason: RejectReason,
    readonly message: string,
  ) {}
}

const hasOwn = (o: object, key: string): boolean => Object.prototype.hasOwnProperty.call(o, key);

/** A short, printable rendering of a value for messages. */
function show(v: unknown): string {
  let text: string;
  if (v instanceof JsonNumber) text = typeof v.text === 'string' ? v.text : 'a number';
  else if (typeof v === 'string') text = JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v);
  else if (v === null) text = 'null';
  else if (Array.isArray(v)) text = 'an array';
  else if (typeof v === 'object') text = 'an object';
  else if (typeof v === 'boolean' || typeof v === 'number' || typeof v === 'bigint') text = String(v);
  else text = `a ${typeof v}`;
  return text.length > 44 ? text.slice(0, 43) + '…' : text;
}

/** Number text, from a JsonNumber or (for entries built in code) a finite JS number; undefined otherwise. */
function numberText(v: unknown): string | undefined {
  if (v instanceof JsonNumber) return typeof v.text === 'string' ? v.text : undefined;
  if (typeof v === 'number' && Number.isFinite(v)) return String(v);
  return undefined;
}

const EXPONENT_RE = /^(.*[0-9])[eE]([+-]?)([0-9]+)$/;
/** The mantissas parseDecimal accepts. */
const MANTISSA_RE = /^[+-]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)$/;

/**
 * parseDecimal with exponents of any length: money.ts only accepts up to 4
 * exponent digits, so "1e00003" (= 1000) or "0e10000" (= 0) would be
 * NOT_A_NUMBER. Exponents are normalised first; a huge one is either zero,
 * out of range or too precise, as parseDecimal would say.
 */
function parseDecimalText(text: string, scale: number): bigint {
  const m = EXPONENT_RE.exec(text);
  if (m) {
    const [, mantissa, sign, expDigits] = m;
    const exp = expDigits.replace(/^0+(?=[0-9])/, '');
    if (exp.length <= 4) return parseDecimal(`${mantissa}e${sign}${exp}`, scale);
    if (!MANTISSA_RE.test(mantissa)) throw new DecimalError(`not a decimal number: ${text.slice(0, 40)}`, 'NOT_A_NUMBER');
    if (!/[1-9]/.test(mantissa)) return 0n;
    if (sign === '-') throw new DecimalError(`${text.slice(0, 40)} has more than ${scale} decimal places`, 'TOO_PRECISE');
    throw new DecimalError(`${text.slice(0, 40)} is out of range`, 'OUT_OF_RANGE');
  }
  return parseDecimal(text, scale);
}

// ---------------------------------------------------------------------------
// Fields
// ---------------------------------------------------------------------------

function userIdOf(o: Obj): number {
  if (!hasOwn(o, 'userId')) throw new Reject('INVALID_USER_ID', 'userId is missing');
  const v: unknown = o.userId;
  const bad = (): Reject => new Reject('INVALID_USER_ID', `userId must be a positive integer, got ${show(v)}`);
  let scaled: bigint;
  if (typeof v === 'string') {
    // A string of ASCII digits only: no sign, no spaces, no decimal point.
    if (!/^[0-9]{1,20}$/.test(v)) throw bad();
    scaled = BigInt(v);
  } else {
    const text = numberText(v);
    if (text === undefined) throw bad();
    try {
      scaled = parseDecimalText(text, 0);
    } catch {
      throw bad(); // fractional, negative or huge
    }
  }
  if (scaled < 1n || scaled > BigInt(Number.MAX_SAFE_INTEGER)) throw bad();
  return Number(scaled);
}

/** Control characters (C0, DEL, C1): not allowed in names and ids (PostgreSQL rejects NUL in text). */
const CONTROL_RE = /[\u0000-\u001f\u007f-\u009f]/;

function codePointLength(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
    n++;
  }
  return n;
}

function serviceField(o: Obj, key: 'service' | 'resource'): string | undefined {
  if (!hasOwn(o, key)) return undefined;
  const v: unknown = o[key];
  if (v === null) return undefined; // null counts as absent
  if (typeof v !== 'string') throw new Reject('INVALID_SERVICE', `${key} must be a string, got ${show(v)}`);
  const name = v.trim();
  if (name === '') throw new Reject('INVALID_SERVICE', `${key} must not be empty`);
  if (codePointLength(name) > MAX_SERVICE_CHARS) {
    throw new Reject('INVALID_SERVICE', `${key} must be at most ${MAX_SERVICE_CHARS} characters`);
  }
  if (CONTROL_RE.test(name)) throw new Reject('INVALID_SERVICE', `${key} must not contain control characters`);
  return name;
}

function serviceOf(o: Obj): string {
  const service = serviceField(o, 'service');
  const resource = serviceField(o, 'resource');
  if (service === undefined && resource === undefined) {
    throw new Reject('MISSING_SERVICE', 'service is missing (neither "service" nor "resource" is set)');
  }
  if (service !== undefined && resource !== undefined && service !== resource) {
    throw new Reject('CONFLICTING_SERVICE', `service ${show(service)} and resource ${show(resource)} differ`);
  }
  return (service ?? resource) as string;
}

function quantityOf(o: Obj): bigint {
  if (!hasOwn(o, 'quantity')) throw new Reject('INVALID_QUANTITY', 'quantity is missing');
  const v: unknown = o.quantity;
  const text = typeof v === 'string' ? v : numberText(v);
  if (text === undefined) throw new Reject('INVALID_QUANTITY', `quantity must be a number or a decimal string, got ${show(v)}`);
  let q: bigint;
  try {
    q = parseDecimalText(text, QUANTITY_SCALE);
  } catch (e) {
    const code = e instanceof DecimalError ? e.code : 'NOT_A_NUMBER';
    switch (code) {
      case 'NEGATIVE':
        throw new Reject('NEGATIVE_QUANTITY', `quantity must not be negative, got ${show(v)}`);
      case 'TOO_PRECISE':
        throw new Reject('QUANTITY_TOO_PRECISE', `quantity must have at most ${QUANTITY_SCALE} decimal places, got ${show(v)}`);
      case 'OUT_OF_RANGE':
        throw new Reject('QUANTITY_OUT_OF_RANGE', `quantity must be at most 1000000000000, got ${show(v)}`);
      default:
        throw new Reject('INVALID_QUANTITY', `quantity is not a decimal number: ${show(v)}`);
    }
  }
  if (q > MAX_QUANTITY_SCALED) {
    throw new Reject('QUANTITY_OUT_OF_RANGE', `quantity must be at most 1000000000000, got ${show(v)}`);
  }
  return q;
}

const TIMESTAMP_RE =
  /^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,12}))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))$/;

function daysInMonth(year: number, month: number): number {
  if (month === 2) return (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0 ? 29 : 28;
  return month === 4 || month === 6 || month === 9 || month === 11 ? 30 : 31;
}

function timestampOf(o: Obj, now: Date, maxFutureSkewMs: number): Date {
  if (!hasOwn(o, 'timestamp')) throw new Reject('INVALID_TIMESTAMP', 'timestamp is missing');
  const v: unknown = o.timestamp;
  const bad = (why: string): Reject => new Reject('INVALID_TIMESTAMP', `timestamp ${why}, got ${show(v)}`);
  if (typeof v !== 'string') throw bad('must be an RFC 3339 string');
  const m = v.length <= 64 ? TIMESTAMP_RE.exec(v) : null;
  if (!m) throw bad('must be an RFC 3339 date-time with a timezone, e.g. "2024-01-15T10:00:00Z"');
  const year = Number(m[1]);
  const month = Number(m[2]);
  const day = Number(m[3]);
  const hour = Number(m[4]);
  const minute = Number(m[5]);
  const second = Number(m[6]);
  const millis = m[7] ? Number(m[7].slice(0, 3).padEnd(3, '0')) : 0;
  if (month < 1 || month > 12 || day < 1 || day > daysInMonth(year, month) || hour > 23 || minute > 59 || second > 59) {
    throw bad('is not a valid date and time');
  }
  let offsetMinutes = 0;
  if (m[8]) {
    const oh = Number(m[9]);
    const om = Number(m[10]);
    if (oh > 23 || om > 59) throw bad('has an invalid timezone offset');
    offsetMinutes = (m[8] === '-' ? -1 : 1) * (oh * 60 + om);
  }
  const ms = Date.UTC(year, month - 1, day, hour, minute, second, millis) - offsetMinutes * 60_000;
  if (!(ms >= MIN_TIMESTAMP_MS)) throw bad('must not be before 2000-01-01T00:00:00Z');
  const limit = now.getTime() + maxFutureSkewMs;
  if (!(ms <= limit)) {
    throw new Reject('FUTURE_TIMESTAMP', `timestamp ${show(v)} is in the future`);
  }
  return new Date(ms);
}

function eventIdOf(o: Obj): string | undefined {
  if (!hasOwn(o, 'id')) return undefined;
  const v: unknown = o.id;
  let id: string | undefined;
  if (typeof v === 'string') {
    id = v;
  } else {
    const text = numberText(v);
    if (text !== undefined && /^-?[0-9]+$/.test(text)) id = text;
  }
  if (id === undefined) throw new Reject('INVALID_ID', `id must be a string or an integer, got ${show(v)}`);
  if (id.length === 0) throw new Reject('INVALID_ID', 'id must not be empty');
  if (id.length > MAX_EVENT_ID_CHARS) throw new Reject('INVALID_ID', `id must be at most ${MAX_EVENT_ID_CHARS} characters`);
  if (CONTROL_RE.test(id)) throw new Reject('INVALID_ID', 'id must not contain control characters');
  return id;
}

// ---------------------------------------------------------------------------

/**
 * Validates one entry. `now` and `maxFutureSkewMs` bound timestamps from above
 * (a timestamp exactly at now + maxFutureSkewMs is accepted).
 */
export function validateEntry(entry: RawEntry, now: Date, maxFutureSkewMs: number): Validation {
  try {
    if (entry === null || typeof entry !== 'object') {
      return { ok: false, reason: 'INVALID_JSON', message: 'the entry is missing' };
    }
    if (entry.error !== undefined || !hasOwn(entry, 'value') || entry.value === undefined) {
      const why = typeof entry.error === 'string' ? `: ${entry.error}` : '';
      return { ok: false, reason: 'INVALID_JSON', message: `the entry is not valid JSON${why}` };
    }
    const v: unknown = entry.value;
    if (v === null || typeof v !== 'object' || Array.isArray(v) || v instanceof JsonNumber) {
      return { ok: false, reason: 'NOT_AN_OBJECT', message: `the entry must be a JSON object, got ${show(v)}` };
    }
    const o = v as Obj;
    const userId = userIdOf(o);
    const service = serviceOf(o);
    const quantity = quantityOf(o);
    const timestamp = timestampOf(o, now, maxFutureSkewMs);
    const eventId = eventIdOf(o);
    const usage: ValidUsage = {
      userId,
      service,
      quantity,
      quantityText: formatDecimal(quantity, QUANTITY_SCALE),
      timestamp,
    };
    if (eventId !== undefined) usage.eventId = eventId;
    return { ok: true, usage };
  } catch (e) {
    if (e instanceof Reject) return { ok: false, reason: e.reason, message: e.message };
    // Not reachable for values produced by the parser; kept so that the function is total.
    return { ok: false, reason: 'INVALID_JSON', message: 'the entry could not be read' };
  }
}

// ---- identity ------------------------------------------------------------------

export type IdentityKind = 'e' | 'c' | 'r';

const digest = (text: string): string => createHash('sha256').update(text).digest('base64url').slice(0, 22);

export function usageIdentity(usage: ValidUsage): { kind: IdentityKind; identity: string } {
  if (usage.eventId !== undefined) return { kind: 'e', identity: usage.eventId };
  const content = `${usage.userId}\n${usage.service}\n${usage.quantity}\n${usage.timestamp.getTime()}`;
  return { kind: 'c', identity: digest(content) };
}

export const rejectedIdentity = (raw: string): { kind: IdentityKind; identity: string } => ({ kind: 'r', identity: digest(raw) });
