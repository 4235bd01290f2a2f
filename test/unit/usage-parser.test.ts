import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import fc from 'fast-check';
import {
  JsonNumber,
  type JsonValue,
  MAX_DEPTH,
  MAX_ENTRY_CHARS,
  type RawEntry,
  type ReadOptions,
  UsageFileError,
  type UsageFileFormat,
  type UsageFileHandle,
  UsageSourceError,
  readUsageFile,
  readUsageHandle,
} from '../../src/usage/parser';
import { execFileSync } from 'child_process';

let dir: string;
let fileNo = 0;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'usage-parser-'));
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function write(content: string | Buffer): string {
  const file = path.join(dir, `f${fileNo++}.log`);
  fs.writeFileSync(file, content);
  return file;
}

interface ReadResult {
  entries: RawEntry[];
  batches: number[];
  format: UsageFileFormat;
}

async function readAll(file: string, opts?: ReadOptions): Promise<ReadResult> {
  const entries: RawEntry[] = [];
  const batches: number[] = [];
  const gen = readUsageFile(file, opts);
  for (;;) {
    const r = await gen.next();
    if (r.done) return { entries, batches, format: r.value };
    batches.push(r.value.length);
    entries.push(...r.value);
  }
}

async function readText(content: string | Buffer, opts?: ReadOptions): Promise<ReadResult> {
  const file = write(content);
  try {
    return await readAll(file, opts);
  } finally {
    fs.rmSync(file, { force: true });
  }
}

/** Reads and expects a UsageFileError; returns it with the entries yielded before it. */
async function readFailing(content: string): Promise<{ error: UsageFileError; entries: RawEntry[] }> {
  const entries: RawEntry[] = [];
  try {
    for await (const batch of readUsageFile(write(content), { batchSize: 1 })) entries.push(...batch);
  } catch (e) {
    if (e instanceof UsageFileError) return { error: e, entries };
    throw e;
  }
  throw new Error('expected a UsageFileError');
}

/** JsonValue -> what JSON.parse would give (JsonNumber -> Number). */
function plain(v: JsonValue | undefined): unknown {
  if (v instanceof JsonNumber) return Number(v.text);
  if (Array.isArray(v)) return v.map(plain);
  if (v !== null && typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v)) {
      Object.defineProperty(out, k, { value: plain(v[k]), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }
  return v;
}

const values = (entries: RawEntry[]): unknown[] => entries.map((e) => plain(e.value));

describe('readUsageFile: JSON arrays', () => {
  it('reads a JSON array of usage objects with ordinals, start lines and exact raw text', async () => {
    const text = '[\n  {"userId": 1, "service": "api-calls", "quantity": 1000, "timestamp": "2024-01-15T10:00:00Z"},\n  {"userId": 2}\n]\n';
    const { entries, format } = await readText(text);
    expect(format).toBe('json-array');
    expect(entries.map((e) => [e.ordinal, e.line, e.raw])).toEqual([
      [0, 2, '{"userId": 1, "service": "api-calls", "quantity": 1000, "timestamp": "2024-01-15T10:00:00Z"}'],
      [1, 3, '{"userId": 2}'],
    ]);
    const first = entries[0].value as Record<string, JsonValue>;
    expect(first.userId).toBeInstanceOf(JsonNumber);
    expect((first.quantity as JsonNumber).text).toBe('1000');
    expect(first.service).toBe('api-calls');
    expect(entries.every((e) => e.error === undefined)).toBe(true);
  });

  it('accepts any JSON value as an array element (validation happens later)', async () => {
    const { entries } = await readText('[1, "two", true, false, null, [3], {"a": {"b": []}}]');
    expect(values(entries)).toEqual([1, 'two', true, false, null, [3], { a: { b: [] } }]);
  });

  it('reads an empty array as zero entries', async () => {
    const { entries, format, batches } = await readText('  [ \n ]  \n');
    expect(format).toBe('json-array');
    expect(entries).toEqual([]);
    expect(batches).toEqual([]);
  });

  it('reports the start line of elements of a pretty-printed array', async () => {
    const arr = [{ a: 1, b: [1, 2] }, { c: 'x' }, 3];
    const { entries } = await readText(JSON.stringify(arr, null, 2));
    expect(entries.map((e) => e.line)).toEqual([2, 9, 12]);
    expect(entries.map((e) => JSON.parse(e.raw))).toEqual(arr);
  });

  it('counts CRLF line endings as one line each', async () => {
    const { entries } = await readText('[\r\n{"a":1},\r\n\r\n{"b":2}\r\n]\r\n');
    expect(entries.map((e) => [e.line, e.raw])).toEqual([
      [2, '{"a":1}'],
      [4, '{"b":2}'],
    ]);
  });

  it('throws UsageFileError with line and column when a comma is missing', async () => {
    const text = '[\n  {"a": 1}\n  {"b": 2}\n]';
    const { error, entries } = await readFailing(text);
    expect(entries).toHaveLength(1);
    expect(error.line).toBe(3);
    expect(error.column).toBe(3);
    expect(error.offset).toBe(text.indexOf('{"b"'));
    expect(error.message).toBe(`JSON syntax error at line 3, column 3 (offset ${error.offset}): expected ',' or ']' but found '{'`);
  });

  it('throws UsageFileError at the bad token inside an element', async () => {
    const text = '[{"a": 1},\n {"b": tru}]';
    const { error } = await readFailing(text);
    expect([error.line, error.column, error.offset]).toEqual([2, 11, text.indexOf('}]')]);
    expect(error.message).toMatch(/^JSON syntax error at line 2, column 11 \(offset \d+\): unexpected character '}', expected 'true'$/);
  });

  it('throws UsageFileError when the file is cut in the middle of an element', async () => {
    const text = '[\n  {"userId": 1},\n  {"userId": 2, "service": "ap';
    const { error, entries } = await readFailing(text);
    expect(entries.map((e) => e.raw)).toEqual(['{"userId": 1}']);
    expect(error.message).toMatch(/^unexpected end of file: the JSON array is truncated/);
    const lastLine = '  {"userId": 2, "service": "ap';
    expect([error.line, error.column, error.offset]).toEqual([3, lastLine.length + 1, text.length]);
  });

  it('throws UsageFileError when the file is cut right after the last element, before the closing bracket', async () => {
    const text = '[\n  {"userId": 1},\n  {"userId": 2}';
    const { error, entries } = await readFailing(text);
    expect(entries).toHaveLength(2);
    expect(error.message).toMatch(/^unexpected end of file: the JSON array is truncated/);
    expect([error.line, error.column, error.offset]).toEqual([3, '  {"userId": 2}'.length + 1, text.length]);
  });

  it('places the truncation on the next line when the cut file ends with a newline', async () => {
    const { error } = await readFailing('[1,\n2\n');
    expect([error.line, error.column, error.offset]).toEqual([3, 1, 6]);
  });

  it('throws UsageFileError for data after the closing bracket but accepts trailing whitespace', async () => {
    const { error, entries } = await readFailing('[1, 2]\n  x');
    expect(entries).toHaveLength(2);
    expect([error.line, error.column, error.offset]).toEqual([2, 3, 9]);
    expect(error.message).toContain("after the end of the JSON array");
    const ok = await readText('[1, 2]\n \t\r\n');
    expect(values(ok.entries)).toEqual([1, 2]);
    await expect(readText('[1][2]')).rejects.toBeInstanceOf(UsageFileError);
  });

  it.each([
    ['a trailing comma', '[1, 2,]'],
    ['a leading comma', '[,1]'],
    ['a trailing comma in an object', '[{"a": 1,}]'],
    ['a leading zero', '[01]'],
    ['NaN', '[NaN]'],
    ['Infinity', '[Infinity]'],
    ['a comment', '[1 /* c */]'],
    ['a single-quoted string', "['a']"],
    ['an unquoted key', '[{a: 1}]'],
    ['a raw newline in a string', '["a\nb"]'],
    ['a raw tab in a string', '["a\tb"]'],
    ['an invalid escape', '["\\x"]'],
    ['a short \\u escape', '["\\u12g4"]'],
    ['a bare minus', '[-]'],
    ['a fraction without digits', '[1.]'],
    ['an exponent without digits', '[1e]'],
    ['a plus sign', '[+1]'],
    ['only an opening bracket', '['],
  ])('rejects %s with UsageFileError', async (_name, text) => {
    await expect(readText(text)).rejects.toBeInstanceOf(UsageFileError);
  });

  it('yields the batches before a syntax error (the caller rolls back)', async () => {
    const { error, entries } = await readFailing('[1, 2, 3, x]');
    expect(values(entries)).toEqual([1, 2, 3]);
    expect(error.column).toBe(11);
  });

  it('rejects nesting deeper than MAX_DEPTH without overflowing the stack', async () => {
    const deep = '['.repeat(200_000);
    const { error } = await readFailing(deep);
    expect(error.message).toContain('nesting deeper than');
    const ok = await readText('[' + '['.repeat(MAX_DEPTH - 1) + ']'.repeat(MAX_DEPTH - 1) + ']');
    expect(ok.entries).toHaveLength(1);
    await expect(readText('[' + '['.repeat(MAX_DEPTH) + ']'.repeat(MAX_DEPTH) + ']')).rejects.toBeInstanceOf(UsageFileError);
  });

  it('rejects an array element longer than MAX_ENTRY_CHARS with UsageFileError', async () => {
    const big = '"' + 'x'.repeat(MAX_ENTRY_CHARS) + '"';
    const { error, entries } = await readFailing(`[1,\n ${big}, 2]`);
    expect(entries).toHaveLength(1);
    expect([error.line, error.column, error.offset]).toEqual([2, 2, 5]);
    expect(error.message).toContain('longer than');
    const justFits = '"' + 'x'.repeat(MAX_ENTRY_CHARS - 2) + '"';
    const ok = await readText(`[${justFits}]`);
    expect(ok.entries[0].raw).toHaveLength(MAX_ENTRY_CHARS);
  });
});

describe('readUsageFile: NDJSON', () => {
  it('reads one entry per line with line numbers and raw lines', async () => {
    const text = '{"userId": 1, "quantity": 5}\n{"userId": 2, "quantity": 0.5}\n';
    const { entries, format } = await readText(text);
    expect(format).toBe('ndjson');
    expect(entries.map((e) => [e.ordinal, e.line, e.raw])).toEqual([
      [0, 1, '{"userId": 1, "quantity": 5}'],
      [1, 2, '{"userId": 2, "quantity": 0.5}'],
    ]);
    expect(values(entries)).toEqual([
      { userId: 1, quantity: 5 },
      { userId: 2, quantity: 0.5 },
    ]);
  });

  it('skips blank and whitespace-only lines without counting them as entries', async () => {
    const text = '\n\n  \n{"a":1}\n\n \t \n{"a":2}\n\n';
    const { entries } = await readText(text);
    expect(entries.map((e) => [e.ordinal, e.line])).toEqual([
      [0, 4],
      [1, 7],
    ]);
  });

  it('keeps leading and trailing spaces of a line in raw', async () => {
    const { entries } = await readText('  {"a":1}  \n\t{"a":2}');
    expect(entries.map((e) => e.raw)).toEqual(['  {"a":1}  ', '\t{"a":2}']);
  });

  it('handles CRLF line endings (raw has no CR)', async () => {
    const { entries } = await readText('{"a":1}\r\n\r\n{"a":2}\r\n');
    expect(entries.map((e) => [e.line, e.raw])).toEqual([
      [1, '{"a":1}'],
      [3, '{"a":2}'],
    ]);
    expect(values(entries)).toEqual([{ a: 1 }, { a: 2 }]);
  });

  it('reads a final line without a trailing newline', async () => {
    const { entries } = await readText('{"a":1}\n{"a":2}');
    expect(values(entries)).toEqual([{ a: 1 }, { a: 2 }]);
    const crOnly = await readText('{"a":1}\n{"a":2}\r');
    expect(crOnly.entries[1].raw).toBe('{"a":2}');
  });

  it('turns a bad line into an error entry and keeps reading the next lines', async () => {
    const text = '{"a":1}\n{"a": x}\n{"a":3}\n';
    const { entries } = await readText(text);
    expect(entries.map((e) => e.ordinal)).toEqual([0, 1, 2]);
    expect(entries[1]).toEqual({
      ordinal: 1,
      line: 2,
      raw: '{"a": x}',
      error: "unexpected character 'x' at column 7, expected a value",
    });
    expect(entries[1].value).toBeUndefined();
    expect(values([entries[0], entries[2]])).toEqual([{ a: 1 }, { a: 3 }]);
  });

  it.each([
    ['two values on one line', '{"a":1} {"b":2}', "unexpected character '{' after the JSON value at column 9"],
    ['a truncated object', '{"a":1', "unexpected end of line at column 7, expected ',' or '}'"],
    ['an unterminated string', '{"a":"abc', 'unexpected end of line at column 10'],
    ['a trailing comma', '{"a":1,}', "unexpected character '}' at column 8, expected a string key"],
    ['a leading zero', '{"a":01}', 'leading zeros are not allowed in numbers at column 7'],
    ['a control character in a string', '{"a":"x\u0001"}', 'control character U+0001 in a string must be escaped at column 8'],
    ['an invalid escape', '{"a":"\\q"}', 'invalid escape sequence'],
    ['NaN', '{"a":NaN}', "unexpected character 'N' at column 6, expected a value"],
    ['a missing colon', '{"a" 1}', "unexpected character '1' at column 6, expected ':' after an object key"],
  ])('reports %s as an error entry', async (_name, line, message) => {
    const { entries } = await readText(`{"ok":1}\n${line}\n{"ok":2}\n`);
    expect(entries).toHaveLength(3);
    expect(entries[1].error).toContain(message);
    expect(entries[1].raw).toBe(line);
    expect(entries[2].value).toBeDefined();
  });

  it('treats a first line that does not start with { as a bad or non-object line', async () => {
    const bad = await readText('hello\n{"a":1}\n');
    expect(bad.format).toBe('ndjson');
    expect(bad.entries[0].error).toBe("unexpected character 'h' at column 1, expected a value");
    expect(values([bad.entries[1]])).toEqual([{ a: 1 }]);
    const scalar = await readText('42\n"x"\n');
    expect(scalar.format).toBe('ndjson');
    expect(values(scalar.entries)).toEqual([42, 'x']);
  });

  it('accepts an array value on a later line', async () => {
    const { entries } = await readText('{"a":1}\n[1,2]\n');
    expect(values(entries)).toEqual([{ a: 1 }, [1, 2]]);
  });

  it('turns a line longer than MAX_ENTRY_CHARS into an error entry and reads the next line', async () => {
    const long = '{"a":"' + 'x'.repeat(MAX_ENTRY_CHARS * 2) + '"}';
    const { entries } = await readText(`{"n":1}\n${long}\n{"n":3}`);
    expect(entries.map((e) => e.line)).toEqual([1, 2, 3]);
    expect(entries[1].error).toContain('longer than');
    expect(entries[1].raw.length).toBeLessThan(2000);
    expect(values([entries[0], entries[2]])).toEqual([{ n: 1 }, { n: 3 }]);
  });

  it('turns a very long final line without a newline into one error entry', async () => {
    const { entries } = await readText('{"n":1}\n{"a":"' + 'y'.repeat(MAX_ENTRY_CHARS + 70_000));
    expect(entries).toHaveLength(2);
    expect(entries[1].error).toContain('longer than');
  });

  it('reports deep nesting in a line as an error entry', async () => {
    const { entries } = await readText('{"a":' + '['.repeat(100_000) + '\n{"b":1}\n');
    expect(entries[0].error).toContain('nesting deeper than');
    expect(values([entries[1]])).toEqual([{ b: 1 }]);
  });
});

describe('readUsageFile: only a regular file, every read bounded', () => {
  it('refuses a FIFO at once, without waiting for a writer', async () => {
    const fifo = path.join(dir, `fifo${fileNo++}`);
    execFileSync('mkfifo', [fifo]);
    await expect(readAll(fifo)).rejects.toThrow(new UsageSourceError('it is a FIFO, not a regular file'));
  });

  it('refuses a directory and a device', async () => {
    await expect(readAll(dir)).rejects.toThrow(new UsageSourceError('it is a directory, not a regular file'));
    await expect(readAll('/dev/zero')).rejects.toThrow(new UsageSourceError('it is a device, not a regular file'));
  });

  it('fails a read that stalls (a hung mount) after the read timeout, and closes the file', async () => {
    let closed = false;
    let reads = 0;
    const stalled: UsageFileHandle = {
      read: ((buffer: Buffer) => {
        reads++;
        if (reads === 1) return Promise.resolve({ bytesRead: buffer.write('{"a":1}\n{"a":'), buffer });
        return new Promise(() => undefined); // never answers
      }) as UsageFileHandle['read'],
      close: async () => {
        closed = true;
      },
    };
    const gen = readUsageHandle(stalled, { readTimeoutMs: 200 });
    await expect(gen.next()).rejects.toThrow(/a read of the file took longer than 200 ms/);
    expect(reads).toBe(2);
    expect(closed).toBe(true);
  });
});

describe('readUsageFile: format detection and file handling', () => {
  it('reads an empty file as zero entries of format "empty"', async () => {
    expect(await readText('')).toEqual({ entries: [], batches: [], format: 'empty' });
  });

  it('reads a whitespace-only file as zero entries of format "empty"', async () => {
    expect(await readText(' \n\t\r\n  \n')).toEqual({ entries: [], batches: [], format: 'empty' });
    expect((await readText('\uFEFF  \n')).format).toBe('empty');
    expect((await readText(' '.repeat(300_000))).format).toBe('empty');
  });

  it('skips a UTF-8 BOM in both formats', async () => {
    const arr = await readText('\uFEFF[{"a":1}]');
    expect(arr.format).toBe('json-array');
    expect(values(arr.entries)).toEqual([{ a: 1 }]);
    const nd = await readText('\uFEFF{"a":1}\n{"a":2}\n');
    expect(nd.format).toBe('ndjson');
    expect(nd.entries.map((e) => e.raw)).toEqual(['{"a":1}', '{"a":2}']);
    expect(nd.entries.every((e) => e.error === undefined)).toBe(true);
  });

  it('does not count the BOM in offsets', async () => {
    const { error } = await readFailing('\uFEFF[1 2]');
    expect([error.line, error.column, error.offset]).toEqual([1, 4, 3]);
  });

  it('detects the format after leading blank lines', async () => {
    const arr = await readText('\n\n  [1,\n2]');
    expect(arr.format).toBe('json-array');
    expect(arr.entries.map((e) => e.line)).toEqual([3, 4]);
    const nd = await readText('\n\n  {"a":1}\n');
    expect(nd.format).toBe('ndjson');
    expect(nd.entries.map((e) => [e.line, e.raw])).toEqual([[3, '  {"a":1}']]);
  });

  it('yields batches of at most batchSize entries', async () => {
    const text = Array.from({ length: 10 }, (_, i) => `{"i":${i}}`).join('\n');
    expect((await readText(text, { batchSize: 3 })).batches).toEqual([3, 3, 3, 1]);
    expect((await readText(text)).batches).toEqual([10]);
    expect((await readText(`[${text.split('\n').join(',')}]`, { batchSize: 5 })).batches).toEqual([5, 5]);
  });

  it('rejects a batchSize that is not a positive integer', async () => {
    await expect(readText('[]', { batchSize: 0 })).rejects.toBeInstanceOf(RangeError);
    await expect(readText('[]', { batchSize: 1.5 })).rejects.toBeInstanceOf(RangeError);
  });

  it('throws an error with code ENOENT for a missing file', async () => {
    await expect(readAll(path.join(dir, 'does-not-exist.json'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('can be stopped early by the consumer', async () => {
    const file = write(Array.from({ length: 5000 }, (_, i) => `{"i":${i}}`).join('\n'));
    let seen = 0;
    for await (const batch of readUsageFile(file, { batchSize: 10 })) {
      seen += batch.length;
      if (seen >= 20) break;
    }
    expect(seen).toBe(20);
  });

  it('reads a 100k-entry file in order with ordinals 0..99999', async () => {
    const n = 100_000;
    const lines = Array.from(
      { length: n },
      (_, i) => `{"userId": ${i + 1}, "service": "api-calls", "quantity": ${i}.5, "timestamp": "2024-01-15T10:00:00Z"}`,
    );
    for (const [format, text] of [
      ['ndjson', lines.join('\n') + '\n'],
      ['json-array', '[\n' + lines.join(',\n') + '\n]\n'],
    ] as const) {
      const file = write(text);
      let expected = 0;
      let ok = true;
      let result: UsageFileFormat | undefined;
      const gen = readUsageFile(file, { batchSize: 777 });
      for (;;) {
        const r = await gen.next();
        if (r.done) {
          result = r.value;
          break;
        }
        expect(r.value.length).toBeLessThanOrEqual(777);
        for (const e of r.value) {
          const v = e.value as Record<string, JsonValue>;
          const line = format === 'ndjson' ? expected + 1 : expected + 2;
          if (e.ordinal !== expected || e.line !== line || (v.userId as JsonNumber).text !== String(expected + 1)) ok = false;
          if ((v.quantity as JsonNumber).text !== `${expected}.5`) ok = false;
          expected++;
        }
      }
      expect(ok).toBe(true);
      expect(expected).toBe(n);
      expect(result).toBe(format);
      fs.rmSync(file);
    }
  });
});

describe('readUsageFile: values', () => {
  it('keeps the exact source text of numbers', async () => {
    const nums = ['0.1', '1e3', '12345678901234567890.123456', '-0', '1E+2', '2.5e-3', '0', '-12.50'];
    const { entries } = await readText(`[${nums.join(',')}, {"q": [0.1]}]`);
    expect(entries.slice(0, nums.length).map((e) => (e.value as JsonNumber).text)).toEqual(nums);
    expect(entries.every((e) => e.raw !== undefined)).toBe(true);
    const nested = entries[nums.length].value as { q: JsonNumber[] };
    expect(nested.q[0]).toEqual(new JsonNumber('0.1'));
    const nd = await readText(`{"quantity": 12345678901234567890.123456}\n`);
    expect(((nd.entries[0].value as Record<string, JsonValue>).quantity as JsonNumber).text).toBe('12345678901234567890.123456');
  });

  it('decodes every JSON string escape, including \\u escapes and surrogate pairs', async () => {
    const literal = '"q\\"b\\\\s\\/b\\bf\\fn\\nr\\rt\\t\\u00e9\\u00E9\\ud83d\\ude00\\u0000\\udc00"';
    const { entries } = await readText(`[${literal}]`);
    expect(entries[0].value).toBe(JSON.parse(literal));
    expect(entries[0].value).toBe('q"b\\s/b\bf\fn\nr\rt\téé😀\u0000\udc00');
  });

  it('reads raw multi-byte UTF-8 characters', async () => {
    const { entries } = await readText('{"s":"é😀日本"}\n');
    expect(values(entries)).toEqual([{ s: 'é😀日本' }]);
  });

  it('stores a "__proto__" key as an own property without changing the prototype', async () => {
    const { entries } = await readText('{"__proto__": {"polluted": true}, "a": 1}\n');
    const v = entries[0].value as Record<string, unknown>;
    expect(Object.getPrototypeOf(v)).toBe(Object.prototype);
    expect(Object.keys(v)).toEqual(['__proto__', 'a']);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    expect(plain(entries[0].value)).toEqual(JSON.parse('{"__proto__": {"polluted": true}, "a": 1}'));
  });

  it('lets the last duplicate key win, like JSON.parse', async () => {
    const { entries } = await readText('{"a":1,"a":2}\n');
    expect(values(entries)).toEqual([{ a: 2 }]);
  });
});

describe('readUsageFile: 64 KiB chunk boundaries', () => {
  const CHUNK = 64 * 1024;
  // Each entry mixes 2- and 4-byte UTF-8 characters, escapes, a long number and literals.
  const entryText = '{"s":"é😀\\u00e9\\ud83d\\ude00\\"\\\\x","n":12345678.125,"t":true,"z":null}';
  const entryBytes = Buffer.byteLength(entryText);

  /** Files whose padding shifts the repeated entries by 0..entryBytes bytes against the chunk boundaries. */
  function paddedFiles(format: 'ndjson' | 'json-array'): Array<{ text: string; buf: Buffer }> {
    const count = Math.ceil((2 * CHUNK) / entryBytes) + 5;
    const files: Array<{ text: string; buf: Buffer }> = [];
    for (let pad = 0; pad <= entryBytes + 1; pad++) {
      const padEntry = `{"pad":"${'p'.repeat(pad)}"}`;
      const all = [padEntry, ...Array.from({ length: count }, () => entryText)];
      const text = format === 'ndjson' ? all.join('\n') + '\n' : '[' + all.join(',') + ']';
      files.push({ text, buf: Buffer.from(text) });
    }
    return files;
  }

  it.each(['ndjson', 'json-array'] as const)(
    'parses %s entries, escapes and multi-byte characters that straddle chunk boundaries',
    async (format) => {
      const splits = new Set<string>();
      for (const { text, buf } of paddedFiles(format)) {
        // What sits at the first boundary: a continuation byte of é (2 bytes) or 😀 (4 bytes), an escape, a number...
        if (buf[CHUNK] >= 0x80 && buf[CHUNK] < 0xc0) {
          let lead = CHUNK - 1;
          while (buf[lead] >= 0x80 && buf[lead] < 0xc0) lead--;
          splits.add(buf[lead] === 0xc3 ? 'é' : `😀 after ${CHUNK - lead} bytes`);
        }
        if (buf[CHUNK - 1] === 0x5c) splits.add('backslash');
        if (buf[CHUNK - 1] === 0x75 && buf[CHUNK - 2] === 0x5c) splits.add('\\u');
        if (buf[CHUNK - 1] >= 0x30 && buf[CHUNK - 1] <= 0x39) splits.add('number');

        const { entries } = await readText(buf);
        const expected = format === 'ndjson' ? text.trim().split('\n').map((l) => JSON.parse(l)) : JSON.parse(text);
        expect(values(entries)).toEqual(expected);
        expect(entries.every((e, i) => e.ordinal === i && e.error === undefined)).toBe(true);
        expect(entries.slice(1).every((e) => e.raw === entryText)).toBe(true);
      }
      // The files really did split the interesting sequences at a boundary.
      expect(splits.has('é')).toBe(true);
      expect(['😀 after 1 bytes', '😀 after 2 bytes', '😀 after 3 bytes'].every((s) => splits.has(s))).toBe(true);
      expect(splits.has('backslash')).toBe(true);
      expect(splits.has('\\u')).toBe(true);
      expect(splits.has('number')).toBe(true);
    },
  );

  it('splits every byte of a 4-byte character across a boundary', async () => {
    for (let k = 1; k <= 3; k++) {
      // The emoji starts k bytes before the boundary.
      const prefix = '{"a":"' + 'x'.repeat(CHUNK - 6 - k);
      const text = prefix + '😀"}\n{"b":"é"}\n';
      expect(Buffer.byteLength(prefix)).toBe(CHUNK - k);
      const { entries } = await readText(text);
      expect(values(entries)).toEqual([{ a: 'x'.repeat(CHUNK - 6 - k) + '😀' }, { b: 'é' }]);
    }
  });

  it('handles a CRLF split between two chunks', async () => {
    const first = '{"a":"' + 'x'.repeat(CHUNK - 9) + '"}\r';
    expect(Buffer.byteLength(first)).toBe(CHUNK);
    const { entries } = await readText(first + '\n{"b":1}\r\n');
    expect(entries.map((e) => e.line)).toEqual([1, 2]);
    expect(entries[0].raw.endsWith('"}')).toBe(true);
    expect(values([entries[1]])).toEqual([{ b: 1 }]);
  });

  it('reports correct line and column for an error after several chunks', async () => {
    const lines = Array.from({ length: 5000 }, (_, i) => `{"i":${i}}`);
    lines[4000] = '{"i":4000}}';
    const text = '[\n' + lines.join(',\n') + '\n]';
    const { error, entries } = await readFailing(text);
    expect(entries).toHaveLength(4001);
    expect([error.line, error.column]).toEqual([4002, 11]);
    expect(error.offset).toBe(text.indexOf('}}') + 1);
  });
});

describe('readUsageFile: properties', () => {
  it('parses JSON.stringify of an array of arbitrary JSON values back to what JSON.parse gives', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.jsonValue(), { maxLength: 20 }), fc.boolean(), async (arr, pretty) => {
        const text = pretty ? JSON.stringify(arr, null, 2) : JSON.stringify(arr);
        const { entries, format } = await readText(text);
        expect(format).toBe('json-array');
        expect(values(entries)).toEqual(JSON.parse(text));
        expect(entries.map((e) => JSON.parse(e.raw))).toEqual(JSON.parse(text));
      }),
      { numRuns: 150 },
    );
  });

  it('parses arbitrary JSON values written one per NDJSON line back to what JSON.parse gives', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.jsonValue(), { maxLength: 20 }), fc.boolean(), async (vals, crlf) => {
        // A first object line makes the file NDJSON even when the next value is an array.
        const lines = ['{}', ...vals.map((v) => JSON.stringify(v))];
        const text = lines.join(crlf ? '\r\n' : '\n');
        const { entries, format } = await readText(text);
        expect(format).toBe('ndjson');
        expect(entries.every((e) => e.error === undefined)).toBe(true);
        expect(values(entries)).toEqual(lines.map((l) => JSON.parse(l)));
        expect(entries.map((e) => e.raw)).toEqual(lines);
      }),
      { numRuns: 150 },
    );
  });

  const tokenSoup = fc
    .array(
      fc.constantFrom('[', ']', '{', '}', ',', ':', '"', '\\', 'u', '0', '1', '9', '-', '+', '.', 'e', 'true', 'nul', ' ', '\n', '\r', '\t', 'é', '😀', 'x', '\u0000', '\uFEFF'),
      { maxLength: 60 },
    )
    .map((parts) => parts.join(''));

  it('never fails with anything but UsageFileError on arbitrary text', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.string({ unit: 'binary', maxLength: 80 }), tokenSoup, tokenSoup.map((s) => '[' + s), tokenSoup.map((s) => '{' + s)),
        async (text) => {
          try {
            const { entries } = await readText(text);
            // Every entry has either a value or an error.
            for (const e of entries) expect((e.value === undefined) !== (e.error === undefined)).toBe(true);
          } catch (e) {
            expect(e).toBeInstanceOf(UsageFileError);
          }
        },
      ),
      { numRuns: 400 },
    );
  });

  it('never fails with anything but UsageFileError on arbitrary bytes', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 100 }), async (bytes) => {
        try {
          await readText(Buffer.from(bytes));
        } catch (e) {
          expect(e).toBeInstanceOf(UsageFileError);
        }
      }),
      { numRuns: 200 },
    );
  });

  it('agrees with JSON.parse on whether an NDJSON line is valid', async () => {
    await fc.assert(
      fc.asyncProperty(tokenSoup, async (line) => {
        const clean = line.replace(/[\r\n]/g, ' ');
        const { entries } = await readText('{}\n' + clean + '\n');
        let valid = true;
        try {
          JSON.parse(clean);
        } catch {
          valid = false;
        }
        if (/^[ \t]*$/.test(clean)) return; // a blank line is no entry
        expect(entries).toHaveLength(2);
        expect(entries[1].error === undefined).toBe(valid);
        if (valid) expect(plain(entries[1].value)).toEqual(JSON.parse(clean));
      }),
      { numRuns: 400 },
    );
  });
});
