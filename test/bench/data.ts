/**
 * Usage files in the existing format ({userId, service, quantity, timestamp},
 * as in data/usage-logs.json), as a JSON array or NDJSON, generated
 * deterministically (seeded PRNG) and written in pieces so the bench itself
 * stays small.
 */
import * as fs from 'node:fs';
import { mulberry32 } from '../helpers/prng';

export type UsageFormat = 'json' | 'ndjson';

export const SERVICES = ['api-calls', 'storage', 'bandwidth', 'compute'] as const;

/** The seeded PRNG of the tests (mulberry32), under the name the benchmarks use. */
export const prng = mulberry32;

const BASE_MS = Date.UTC(2024, 0, 1);
const SPAN_S = 365 * 24 * 3600;

/** Entry i of a run seeded with `seed`: one JSON text. */
export function makeEntry(rand: () => number, users: number): string {
  const userId = 1 + Math.floor(rand() * users);
  const service = SERVICES[Math.floor(rand() * SERVICES.length)];
  // Mostly whole quantities, a quarter with decimals (exact decimal text).
  const whole = 1 + Math.floor(rand() * 1000);
  const quantity = rand() < 0.25 ? `${whole}.${Math.floor(rand() * 1000)}` : String(whole);
  const ts = new Date(BASE_MS + Math.floor(rand() * SPAN_S) * 1000).toISOString().replace('.000Z', 'Z');
  return `{"userId": ${userId}, "service": "${service}", "quantity": ${quantity}, "timestamp": "${ts}"}`;
}

/** Writes `entries` usage entries for users 1..users; returns the file size in bytes. */
export function writeUsageFile(file: string, format: UsageFormat, entries: number, users: number, seed = 42): number {
  const rand = prng(seed);
  const fd = fs.openSync(file, 'w');
  try {
    const parts: string[] = [];
    const flush = () => {
      if (parts.length) fs.writeSync(fd, parts.join(''));
      parts.length = 0;
    };
    if (format === 'json') parts.push('[\n');
    for (let i = 0; i < entries; i++) {
      const text = makeEntry(rand, users);
      if (format === 'json') parts.push(i === 0 ? '  ' : ',\n  ', text);
      else parts.push(text, '\n');
      if (parts.length >= 20_000) flush();
    }
    if (format === 'json') parts.push('\n]\n');
    flush();
  } finally {
    fs.closeSync(fd);
  }
  return fs.statSync(file).size;
}
