import * as fs from 'node:fs';

export interface Entry {
  userId: number | string;
  service: string;
  quantity: number | string;
  timestamp: string;
  id?: string;
}

export const entry = (userId: number, service: string, quantity: number | string, extra: Partial<Entry> = {}): Entry => ({
  userId,
  service,
  quantity,
  timestamp: '2024-01-15T10:00:00Z',
  ...extra,
});

export const writeJsonArray = (file: string, entries: unknown[]): void =>
  fs.writeFileSync(file, '[\n' + entries.map((e) => JSON.stringify(e)).join(',\n') + '\n]\n');

export const writeNdjson = (file: string, entries: unknown[]): void =>
  fs.writeFileSync(file, entries.map((e) => (typeof e === 'string' ? e : JSON.stringify(e))).join('\n') + '\n');

export const appendNdjson = (file: string, entries: unknown[]): void =>
  fs.appendFileSync(file, entries.map((e) => JSON.stringify(e)).join('\n') + '\n');
