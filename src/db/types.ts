/**
 * Column types shared by the entities.
 *
 * Money and quantities are 64-bit integers. node-sqlite3 binds a JS bigint as
 * NULL and reads INTEGER columns back as lossy JS numbers, so values are bound
 * as decimal strings (INTEGER affinity stores them as integers) and read back
 * through `CAST(col AS TEXT)`, which works on SQLite and PostgreSQL alike.
 */
import { Type, type Platform, type EntityProperty } from '@mikro-orm/core';

export class Int64Type extends Type<bigint, string> {
  override convertToDatabaseValue(value: bigint | string | number): string {
    return typeof value === 'bigint' ? value.toString() : String(value);
  }

  override convertToJSValue(value: string | number | bigint): bigint {
    if (typeof value === 'number' && !Number.isSafeInteger(value)) {
      throw new Error('int64 column read through a lossy number');
    }
    return BigInt(value);
  }

  override convertToJSValueSQL(key: string): string {
    return `cast(${key} as text)`;
  }

  override compareAsType(): string {
    return 'string';
  }

  override getColumnType(_prop: EntityProperty, _platform: Platform): string {
    return 'bigint';
  }
}

/** Instants are stored as epoch milliseconds in a 64-bit column on every database. */
export class EpochMsType extends Type<Date, number> {
  override convertToDatabaseValue(value: Date | number): number {
    return value instanceof Date ? value.getTime() : value;
  }

  override convertToJSValue(value: number | string | Date): Date {
    if (value instanceof Date) return value;
    return new Date(Number(value));
  }

  override compareAsType(): string {
    return 'number';
  }

  override getColumnType(): string {
    return 'bigint';
  }
}

/** Reads a 64-bit integer that raw SQL returned through `cast(x as text)`. */
export const int64 = (value: unknown): bigint => BigInt(value as string);
/** Reads an epoch-ms column from raw SQL (a number on SQLite, a string on PostgreSQL). */
export const epochMs = (value: unknown): Date => new Date(Number(value));
