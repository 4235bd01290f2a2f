/**
 * One rule for every string field of every request, applied by the unary
 * adapter to the decoded request before any handler runs: no control
 * characters other than tab, line feed and carriage return. Refused are
 * U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F and U+0080-U+009F.
 *
 * A NUL cut SQLite's statement short (the call failed INTERNAL) and PostgreSQL
 * refuses it in text; the other controls have no place in billing data and
 * make logs and terminals show something else than what is stored.
 *
 * The field is named as in the proto (snake_case, `amount.currency_code` for a
 * nested one, `items[2]` for a repeated one): ts-proto turns `currency_code`
 * into `currencyCode`, and that is turned back here.
 */
import { invalidArgument } from '../shared/errors';

export const INVALID_CHARACTERS = 'INVALID_CHARACTERS';

const CONTROL = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/;

/** ts-proto's camelCase field name back to the proto's snake_case. */
export const protoFieldName = (key: string): string => key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

const isPlainObject = (value: unknown): value is Record<string, unknown> => {
  if (typeof value !== 'object' || value === null) return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
};

/** A refused character and where it is: the path's parts from the innermost out (joined only when one is found). */
type Found = { char: string; parts: string[] };

function find(value: unknown, depth: number): Found | null {
  if (typeof value === 'string') {
    const found = CONTROL.exec(value);
    return found ? { char: found[0], parts: [] } : null;
  }
  if (typeof value !== 'object' || value === null || depth > 32) return null; // decoded protobuf is never this deep
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) {
      const found = find(value[i], depth + 1);
      if (found) return found.parts.push(`[${i}]`), found;
    }
    return null;
  }
  if (isPlainObject(value)) {
    for (const key of Object.keys(value)) {
      const found = find(value[key], depth + 1);
      if (found) return found.parts.push(protoFieldName(key)), found;
    }
  }
  return null; // numbers, bigints, booleans, bytes, dates
}

/** The first string in a decoded message holding a refused character: its proto path and the character. */
export function findControlCharacter(value: unknown): { path: string; char: string } | null {
  const found = find(value, 0);
  if (!found) return null;
  const path = found.parts.reverse().reduce((at, part) => (part.startsWith('[') || at === '' ? at + part : `${at}.${part}`), '');
  return { path, char: found.char };
}

/**
 * Throws INVALID_ARGUMENT/INVALID_CHARACTERS naming the field if any string of the request holds a refused character.
 * `ownRules` names top-level fields whose items the RPC validates one by one (usage events: a bad event is
 * REJECTED with its reason and the rest of its batch goes on), so they are not checked here.
 */
export function checkRequestStrings(request: unknown, ownRules: readonly string[] = []): void {
  const found =
    ownRules.length > 0 && isPlainObject(request)
      ? findControlCharacter(Object.fromEntries(Object.entries(request).filter(([key]) => !ownRules.includes(protoFieldName(key)))))
      : findControlCharacter(request);
  if (!found) return;
  const code = `U+${found.char.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`;
  throw invalidArgument(
    found.path,
    INVALID_CHARACTERS,
    `${found.path} must not contain control characters (found ${code}); tab, line feed and carriage return are allowed`,
  );
}
