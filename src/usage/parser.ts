/**
 * Streaming reader of usage log files.
 *
 * A file is either one JSON array of entries or NDJSON (one JSON value per
 * line). The file is read in 64 KiB chunks and only the unconsumed tail of the
 * text (at most one entry plus one chunk) is kept in memory, so memory does not
 * grow with the size of the file.
 *
 * Values are read by a small hand-written JSON scanner (not JSON.parse) so that
 * numbers keep their exact source text (`JsonNumber`): quantities such as
 * 12345678901234567890.123456 or 0.1 are never rounded through a double.
 *
 * Positions: `offset` and `column` count UTF-16 code units of the decoded text
 * (what JavaScript string indexes count), a leading UTF-8 BOM excluded. Lines
 * are separated by "\n" ("\r\n" works: the "\r" is whitespace / dropped).
 */
import * as fs from 'fs';
import { StringDecoder } from 'string_decoder';

/** A JSON number, kept as its exact source text (e.g. "0.1", "1e3", "-0"). */
export class JsonNumber {
  constructor(readonly text: string) {}
}

export type JsonValue = null | boolean | string | JsonNumber | JsonValue[] | { [key: string]: JsonValue };

export interface RawEntry {
  /** 0-based index of the entry among all entries of the file (array elements, or non-blank NDJSON lines). */
  ordinal: number;
  /** 1-based line where the entry starts. */
  line: number;
  /**
   * Exact source text of the entry (NDJSON: the line without "\n" / "\r\n";
   * array: the element's text). For an NDJSON line longer than
   * MAX_ENTRY_CHARS only its first RAW_PREVIEW_CHARS characters are kept.
   */
  raw: string;
  /** The parsed value, when it parsed. */
  value?: JsonValue;
  /** NDJSON only: why this line is not valid JSON, e.g. "unexpected character 'x' at column 12". */
  error?: string;
}

export type UsageFileFormat = 'json-array' | 'ndjson' | 'empty';

/** The whole file is unusable: a malformed or truncated JSON array. */
export class UsageFileError extends Error {
  override readonly name = 'UsageFileError';
  constructor(
    message: string,
    /** 0-based character offset in the file where the problem is. */
    readonly offset: number,
    /** 1-based line. */
    readonly line: number,
    /** 1-based column. */
    readonly column: number,
  ) {
    super(message);
  }
}

/**
 * The usage source cannot be read safely: it is not a regular file (a FIFO, a
 * device or a directory could block or never end), or opening or reading it
 * took longer than the read timeout (a hung network mount, say).
 */
export class UsageSourceError extends Error {
  override readonly name = 'UsageSourceError';
}

export interface ReadOptions {
  /** Largest number of entries per yielded batch; default 1000. */
  batchSize?: number;
  /** Longest that opening the file or any one read of it may take, in ms; default 30,000. */
  readTimeoutMs?: number;
}

/** Longest accepted entry (an NDJSON line or an array element), in characters. */
export const MAX_ENTRY_CHARS = 1024 * 1024;
/** Deepest accepted nesting of arrays / objects (the outer array of a json-array file counts). */
export const MAX_DEPTH = 256;
/** How much of an oversized NDJSON line is kept in `raw`. */
export const RAW_PREVIEW_CHARS = 1024;

const CHUNK_BYTES = 64 * 1024;
const DEFAULT_BATCH_SIZE = 1000;
const DEFAULT_READ_TIMEOUT_MS = 30_000;

/** `work`, or a UsageSourceError once `ms` have passed (`abandon` then gets what `work` yields, if it ever does). */
function within<T>(work: Promise<T>, ms: number, what: string, abandon: (value: T) => void = () => undefined): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      work.then(abandon, () => undefined);
      reject(new UsageSourceError(`${what} took longer than ${ms} ms (is it on a hung mount?)`));
    }, ms);
  });
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Opens the usage file for reading without ever blocking on it: O_NONBLOCK so
 * that opening a FIFO returns at once, then the opened file itself must be a
 * regular file (checked on the descriptor, so the path cannot be swapped in
 * between). Throws the fs error (ENOENT, ...) or a UsageSourceError.
 */
async function openRegularFile(path: string, timeoutMs: number): Promise<fs.promises.FileHandle> {
  const handle = await within(fs.promises.open(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK), timeoutMs, 'opening the file', (h) => {
    void h.close().catch(() => undefined);
  });
  try {
    const stat = await within(handle.stat(), timeoutMs, 'reading the file status');
    if (!stat.isFile()) {
      const kind = stat.isFIFO() ? 'a FIFO' : stat.isDirectory() ? 'a directory' : stat.isSocket() ? 'a socket' : 'a device';
      throw new UsageSourceError(`it is ${kind}, not a regular file`);
    }
    return handle;
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw err;
  }
}

/** The file's bytes in chunks; every read is bounded by the timeout. */
async function* readChunks(handle: UsageFileHandle, timeoutMs: number): AsyncGenerator<Buffer> {
  for (;;) {
    const buffer = Buffer.allocUnsafe(CHUNK_BYTES);
    const { bytesRead } = await within(handle.read(buffer, 0, CHUNK_BYTES, null), timeoutMs, 'a read of the file');
    if (bytesRead === 0) return;
    yield bytesRead === CHUNK_BYTES ? buffer : buffer.subarray(0, bytesRead);
  }
}

// ---------------------------------------------------------------------------
// The scanner
// ---------------------------------------------------------------------------

/** A syntax error at index `pos` of the scanned string. Not an Error: NDJSON files may hold many bad lines. */
class SyntaxFail {
  constructor(
    readonly pos: number,
    /** What is wrong, e.g. "unexpected character 'x'". */
    readonly msg: string,
    /** The input ended where `expected` was needed. */
    readonly atEnd: boolean,
    /** What was expected instead, e.g. "',' or ']'" (may be empty). */
    readonly expected = '',
  ) {}
}

/** Thrown when the value continues past the end of the text received so far. */
const NEED_MORE: { readonly needMore: true } = { needMore: true };

const C_TAB = 9;
const C_LF = 10;
const C_CR = 13;
const C_SPACE = 32;
const C_QUOTE = 34;
const C_PLUS = 43;
const C_COMMA = 44;
const C_MINUS = 45;
const C_DOT = 46;
const C_0 = 48;
const C_9 = 57;
const C_COLON = 58;
const C_E = 69;
const C_LBRACKET = 91;
const C_BACKSLASH = 92;
const C_RBRACKET = 93;
const C_e = 101;
const C_LBRACE = 123;
const C_RBRACE = 125;

function isJsonWs(c: number): boolean {
  return c === C_SPACE || c === C_LF || c === C_CR || c === C_TAB;
}

function hexValue(c: number): number {
  if (c >= 48 && c <= 57) return c - 48;
  if (c >= 65 && c <= 70) return c - 55;
  if (c >= 97 && c <= 102) return c - 87;
  return -1;
}

/** A character for an error message: 'x', or '\u0001' style for invisible ones. */
function showChar(s: string, pos: number): string {
  const cp = s.codePointAt(pos) ?? 0;
  if (cp < 0x20 || cp === 0x7f || (cp >= 0x80 && cp < 0xa0) || cp === 0xfeff || (cp >= 0xd800 && cp <= 0xdfff)) {
    return `'\\u${cp.toString(16).padStart(4, '0')}'`;
  }
  return `'${String.fromCodePoint(cp)}'`;
}

/**
 * Recursive-descent JSON scanner over `s[i..end)`. When `final` is false the
 * text may continue after `end`, and reaching `end` inside a value throws
 * NEED_MORE (the caller retries the whole value with more text).
 */
class Scanner {
  s = '';
  i = 0;
  end = 0;
  final = true;
  depth = 0;
  /** Global offset of s[0] (for line tracking). */
  base = 0;
  /** Current 1-based line and global offset of its first character. */
  line = 1;
  lineStart = 0;

  skipWs(): void {
    const s = this.s;
    const end = this.end;
    let i = this.i;
    while (i < end) {
      const c = s.charCodeAt(i);
      if (c === C_SPACE || c === C_TAB || c === C_CR) {
        i++;
      } else if (c === C_LF) {
        i++;
        this.line++;
        this.lineStart = this.base + i;
      } else {
        break;
      }
    }
    this.i = i;
  }

  /** Reached `end` where more text was needed. */
  private atEnd(what: string): never {
    if (!this.final) throw NEED_MORE;
    throw new SyntaxFail(this.end, 'unexpected end of input', true, what);
  }

  private fail(pos: number, msg: string): never {
    throw new SyntaxFail(pos, msg, false);
  }

  private unexpected(pos: number, expected: string): never {
    throw new SyntaxFail(pos, `unexpected character ${showChar(this.s, pos)}`, false, expected);
  }

  /** Parses one value starting at `i` (whitespace already skipped). */
  parseValue(): JsonValue {
    const i = this.i;
    if (i >= this.end) this.atEnd('a value');
    const c = this.s.charCodeAt(i);
    switch (c) {
      case C_QUOTE:
        return this.parseString();
      case C_LBRACE:
        return this.parseObject();
      case C_LBRACKET:
        return this.parseArray();
      case 116 /* t */:
        this.literal('true');
        return true;
      case 102 /* f */:
        this.literal('false');
        return false;
      case 110 /* n */:
        this.literal('null');
        return null;
      default:
        if (c === C_MINUS || (c >= C_0 && c <= C_9)) return this.parseNumber();
        return this.unexpected(i, 'a value');
    }
  }

  private literal(word: string): void {
    const s = this.s;
    let i = this.i;
    for (let k = 0; k < word.length; k++, i++) {
      if (i >= this.end) this.atEnd(`'${word}'`);
      if (s.charCodeAt(i) !== word.charCodeAt(k)) this.unexpected(i, `'${word}'`);
    }
    this.i = i;
  }

  private parseNumber(): JsonNumber {
    const s = this.s;
    const end = this.end;
    const start = this.i;
    let i = start;
    let c = s.charCodeAt(i);
    if (c === C_MINUS) {
      i++;
      if (i >= end) this.atEnd('a digit');
      c = s.charCodeAt(i);
    }
    if (c === C_0) {
      i++;
      if (i < end) {
        const d = s.charCodeAt(i);
        if (d >= C_0 && d <= C_9) this.fail(i, 'leading zeros are not allowed in numbers');
      }
    } else if (c >= C_0 + 1 && c <= C_9) {
      i++;
      while (i < end && (c = s.charCodeAt(i)) >= C_0 && c <= C_9) i++;
    } else {
      this.unexpected(i, 'a digit');
    }
    if (i < end && s.charCodeAt(i) === C_DOT) {
      i++;
      if (i >= end) this.atEnd('a digit after the decimal point');
      c = s.charCodeAt(i);
      if (c < C_0 || c > C_9) this.unexpected(i, 'a digit after the decimal point');
      i++;
      while (i < end && (c = s.charCodeAt(i)) >= C_0 && c <= C_9) i++;
    }
    if (i < end && ((c = s.charCodeAt(i)) === C_e || c === C_E)) {
      i++;
      if (i >= end) this.atEnd('an exponent');
      c = s.charCodeAt(i);
      if (c === C_PLUS || c === C_MINUS) {
        i++;
        if (i >= end) this.atEnd('an exponent digit');
        c = s.charCodeAt(i);
      }
      if (c < C_0 || c > C_9) this.unexpected(i, 'an exponent digit');
      i++;
      while (i < end && (c = s.charCodeAt(i)) >= C_0 && c <= C_9) i++;
    }
    // The digits may continue in the next chunk.
    if (i >= end && !this.final) throw NEED_MORE;
    this.i = i;
    return new JsonNumber(s.slice(start, i));
  }

  /** Parses a string starting at the opening quote. */
  private parseString(): string {
    const s = this.s;
    const end = this.end;
    let i = this.i + 1;
    let runStart = i;
    let out = '';
    for (;;) {
      if (i >= end) this.atEnd("'\"' (the string is not closed)");
      const c = s.charCodeAt(i);
      if (c === C_QUOTE) {
        this.i = i + 1;
        return out === '' ? s.slice(runStart, i) : out + s.slice(runStart, i);
      }
      if (c === C_BACKSLASH) {
        if (i > runStart) out += s.slice(runStart, i);
        const escPos = i;
        i++;
        if (i >= end) this.atEnd('an escape sequence');
        const e = s.charCodeAt(i);
        switch (e) {
          case C_QUOTE:
            out += '"';
            break;
          case C_BACKSLASH:
            out += '\\';
            break;
          case 47 /* / */:
            out += '/';
            break;
          case 98 /* b */:
            out += '\b';
            break;
          case 102 /* f */:
            out += '\f';
            break;
          case 110 /* n */:
            out += '\n';
            break;
          case 114 /* r */:
            out += '\r';
            break;
          case 116 /* t */:
            out += '\t';
            break;
          case 117 /* u */: {
            let code = 0;
            for (let k = 1; k <= 4; k++) {
              if (i + k >= end) this.atEnd('four hex digits after \\u');
              const h = hexValue(s.charCodeAt(i + k));
              if (h < 0) this.fail(escPos, 'invalid \\u escape: expected four hex digits');
              code = code * 16 + h;
            }
            // Surrogate pairs need no special handling: JS strings are UTF-16,
            // so two consecutive \uD83D\uDE00 escapes form the pair.
            out += String.fromCharCode(code);
            i += 4;
            break;
          }
          default:
            this.fail(escPos, `invalid escape sequence: backslash followed by ${showChar(s, i)} in a string`);
        }
        i++;
        runStart = i;
        continue;
      }
      if (c < C_SPACE) {
        this.fail(i, `control character U+${c.toString(16).toUpperCase().padStart(4, '0')} in a string must be escaped`);
      }
      i++;
    }
  }

  private enter(pos: number): void {
    if (++this.depth > MAX_DEPTH) this.fail(pos, `nesting deeper than ${MAX_DEPTH} levels`);
  }

  private parseArray(): JsonValue[] {
    this.enter(this.i);
    this.i++;
    const arr: JsonValue[] = [];
    this.skipWs();
    if (this.i >= this.end) this.atEnd("a value or ']'");
    if (this.s.charCodeAt(this.i) === C_RBRACKET) {
      this.i++;
      this.depth--;
      return arr;
    }
    for (;;) {
      arr.push(this.parseValue());
      this.skipWs();
      if (this.i >= this.end) this.atEnd("',' or ']'");
      const c = this.s.charCodeAt(this.i);
      if (c === C_COMMA) {
        this.i++;
        this.skipWs();
        continue;
      }
      if (c === C_RBRACKET) {
        this.i++;
        this.depth--;
        return arr;
      }
      this.unexpected(this.i, "',' or ']'");
    }
  }

  private parseObject(): { [key: string]: JsonValue } {
    this.enter(this.i);
    this.i++;
    const obj: { [key: string]: JsonValue } = {};
    this.skipWs();
    if (this.i >= this.end) this.atEnd("a key or '}'");
    if (this.s.charCodeAt(this.i) === C_RBRACE) {
      this.i++;
      this.depth--;
      return obj;
    }
    for (;;) {
      if (this.s.charCodeAt(this.i) !== C_QUOTE) this.unexpected(this.i, 'a string key');
      const key = this.parseString();
      this.skipWs();
      if (this.i >= this.end) this.atEnd("':'");
      if (this.s.charCodeAt(this.i) !== C_COLON) this.unexpected(this.i, "':' after an object key");
      this.i++;
      this.skipWs();
      const value = this.parseValue();
      if (key === '__proto__') {
        // A plain assignment would replace the prototype; make it an own property like JSON.parse does.
        Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
      } else {
        obj[key] = value;
      }
      this.skipWs();
      if (this.i >= this.end) this.atEnd("',' or '}'");
      const c = this.s.charCodeAt(this.i);
      if (c === C_COMMA) {
        this.i++;
        this.skipWs();
        if (this.i >= this.end) this.atEnd('a string key');
        continue;
      }
      if (c === C_RBRACE) {
        this.i++;
        this.depth--;
        return obj;
      }
      this.unexpected(this.i, "',' or '}'");
    }
  }
}

// ---------------------------------------------------------------------------
// The file readers
// ---------------------------------------------------------------------------

interface Reader {
  /** Consumes `text` (the next decoded piece of the file); `final` on the last call. */
  feed(text: string, final: boolean): void;
}

const ARR_FIRST = 0; // after '[': a value or ']'
const ARR_NEXT = 1; // after ',': a value
const ARR_AFTER = 2; // after a value: ',' or ']'
const ARR_DONE = 3; // after the closing ']': only whitespace

class ArrayReader implements Reader {
  private readonly sc = new Scanner();
  private buf = '';
  private state = ARR_FIRST;
  private ordinal = 0;

  /** `base`, `line`, `lineStart` describe the position of the first character after the opening '['. */
  constructor(
    private readonly out: RawEntry[],
    base: number,
    line: number,
    lineStart: number,
  ) {
    this.sc.base = base;
    this.sc.line = line;
    this.sc.lineStart = lineStart;
  }

  feed(text: string, final: boolean): void {
    const sc = this.sc;
    const buf = this.buf.length === 0 ? text : this.buf + text;
    sc.s = buf;
    sc.i = 0;
    sc.end = buf.length;
    sc.final = final;
    for (;;) {
      sc.skipWs();
      if (sc.i >= sc.end) break;
      const c = buf.charCodeAt(sc.i);
      if (this.state === ARR_AFTER) {
        if (c === C_COMMA) {
          sc.i++;
          this.state = ARR_NEXT;
          continue;
        }
        if (c === C_RBRACKET) {
          sc.i++;
          this.state = ARR_DONE;
          continue;
        }
        this.syntaxError(sc.i, `expected ',' or ']' but found ${showChar(buf, sc.i)}`);
      }
      if (this.state === ARR_DONE) {
        this.syntaxError(sc.i, `unexpected character ${showChar(buf, sc.i)} after the end of the JSON array`);
      }
      if (this.state === ARR_FIRST && c === C_RBRACKET) {
        sc.i++;
        this.state = ARR_DONE;
        continue;
      }
      // An element.
      const start = sc.i;
      const line = sc.line;
      const lineStart = sc.lineStart;
      let value: JsonValue;
      try {
        sc.depth = 1;
        value = sc.parseValue();
      } catch (e) {
        if (e === NEED_MORE) {
          sc.i = start;
          sc.line = line;
          sc.lineStart = lineStart;
          if (sc.end - start > MAX_ENTRY_CHARS) this.tooLarge(start, line, lineStart);
          break;
        }
        if (e instanceof SyntaxFail) this.fromFail(e);
        throw e;
      }
      if (sc.i - start > MAX_ENTRY_CHARS) this.tooLarge(start, line, lineStart);
      this.out.push({ ordinal: this.ordinal++, line, raw: buf.slice(start, sc.i), value });
      this.state = ARR_AFTER;
    }
    if (final) {
      if (this.state !== ARR_DONE) {
        const offset = sc.base + sc.end;
        const column = offset - sc.lineStart + 1;
        throw new UsageFileError(
          `unexpected end of file: the JSON array is truncated (line ${sc.line}, column ${column}, offset ${offset})`,
          offset,
          sc.line,
          column,
        );
      }
      this.buf = '';
      return;
    }
    // Keep only the unconsumed tail (an incomplete element, if any).
    this.buf = sc.i >= buf.length ? '' : buf.slice(sc.i);
    sc.base += sc.i;
    sc.s = '';
  }

  private fromFail(e: SyntaxFail): never {
    if (e.atEnd) {
      // Only when final: the file ended inside an element.
      const offset = this.sc.base + e.pos;
      const column = offset - this.sc.lineStart + 1;
      throw new UsageFileError(
        `unexpected end of file: the JSON array is truncated (line ${this.sc.line}, column ${column}, offset ${offset})`,
        offset,
        this.sc.line,
        column,
      );
    }
    this.syntaxError(e.pos, e.expected ? `${e.msg}, expected ${e.expected}` : e.msg);
  }

  /** A syntax error at index `pos` of the current buffer (on the scanner's current line). */
  private syntaxError(pos: number, msg: string): never {
    const offset = this.sc.base + pos;
    const line = this.sc.line;
    const column = offset - this.sc.lineStart + 1;
    throw new UsageFileError(
      `JSON syntax error at line ${line}, column ${column} (offset ${offset}): ${msg}`,
      offset,
      line,
      column,
    );
  }

  private tooLarge(start: number, line: number, lineStart: number): never {
    const offset = this.sc.base + start;
    const column = offset - lineStart + 1;
    throw new UsageFileError(
      `JSON array element at line ${line}, column ${column} (offset ${offset}) is longer than ${MAX_ENTRY_CHARS} characters`,
      offset,
      line,
      column,
    );
  }
}

class NdjsonReader implements Reader {
  private readonly sc = new Scanner();
  private buf = '';
  /** Start of the current (incomplete) line in `buf`. */
  private pos = 0;
  /** Where to resume looking for '\n' in `buf`. */
  private searchFrom = 0;
  /** 1-based number of the current line. */
  private lineNo: number;
  /** Inside a line that was already reported as too long: drop text until its end. */
  private skipping: boolean;
  private ordinal = 0;

  constructor(
    private readonly out: RawEntry[],
    line: number,
    /** The first line's leading whitespace had to be dropped (it alone was longer than MAX_ENTRY_CHARS). */
    firstLineTooLong: boolean,
  ) {
    this.lineNo = line;
    this.skipping = false;
    if (firstLineTooLong) {
      this.skipping = true;
      this.out.push({
        ordinal: this.ordinal++,
        line,
        raw: '',
        error: `line is longer than ${MAX_ENTRY_CHARS} characters`,
      });
    }
  }

  feed(text: string, final: boolean): void {
    let buf: string;
    if (this.pos > 0 && this.pos < this.buf.length) buf = this.buf.slice(this.pos) + text;
    else if (this.pos === 0 && this.buf.length > 0) buf = this.buf + text;
    else buf = text;
    this.searchFrom -= this.pos;
    if (this.searchFrom < 0) this.searchFrom = 0;
    this.buf = buf;
    let pos = 0;
    for (;;) {
      const nl = buf.indexOf('\n', this.searchFrom);
      if (nl < 0) {
        if (final) {
          if (!this.skipping && pos < buf.length) this.line(buf, pos, buf.length);
          pos = buf.length;
        } else if (this.skipping) {
          pos = buf.length;
        } else if (buf.length - pos > MAX_ENTRY_CHARS + 1 /* a possible '\r' */) {
          this.tooLong(buf, pos);
          this.skipping = true;
          pos = buf.length;
        }
        this.searchFrom = buf.length;
        break;
      }
      if (this.skipping) this.skipping = false;
      else this.line(buf, pos, nl);
      this.lineNo++;
      pos = nl + 1;
      this.searchFrom = pos;
    }
    this.pos = pos;
    if (final) {
      this.buf = '';
      this.pos = 0;
    }
  }

  private tooLong(buf: string, start: number): void {
    this.out.push({
      ordinal: this.ordinal++,
      line: this.lineNo,
      raw: buf.slice(start, start + RAW_PREVIEW_CHARS),
      error: `line is longer than ${MAX_ENTRY_CHARS} characters`,
    });
  }

  /** One complete line: buf[start..lineEnd), without its '\n'. */
  private line(buf: string, start: number, lineEnd: number): void {
    let end = lineEnd;
    if (end > start && buf.charCodeAt(end - 1) === C_CR) end--;
    const sc = this.sc;
    sc.s = buf;
    sc.i = start;
    sc.end = end;
    sc.final = true;
    sc.skipWs();
    if (sc.i >= end) return; // blank line
    if (end - start > MAX_ENTRY_CHARS) {
      this.tooLong(buf, start);
      return;
    }
    const raw = buf.slice(start, end);
    try {
      sc.depth = 0;
      const value = sc.parseValue();
      sc.skipWs();
      if (sc.i < end) {
        throw new SyntaxFail(sc.i, `unexpected character ${showChar(buf, sc.i)} after the JSON value`, false);
      }
      this.out.push({ ordinal: this.ordinal++, line: this.lineNo, raw, value });
    } catch (e) {
      if (!(e instanceof SyntaxFail)) throw e;
      const what = e.atEnd ? 'unexpected end of line' : e.msg;
      const error = `${what} at column ${e.pos - start + 1}${e.expected ? `, expected ${e.expected}` : ''}`;
      this.out.push({ ordinal: this.ordinal++, line: this.lineNo, raw, error });
    }
  }
}

/**
 * Decides the format from the first non-whitespace character, consuming
 * leading whitespace without keeping it (a file of only whitespace is 'empty').
 */
class Detector {
  /** Whitespace of the current line seen so far (NDJSON keeps it in `raw`). */
  private indent = '';
  private indentTooLong = false;
  private offset = 0;
  private line = 1;
  private lineStart = 0;
  reader: Reader | undefined;
  format: UsageFileFormat = 'empty';

  constructor(private readonly out: RawEntry[]) {}

  feed(text: string, final: boolean): void {
    if (this.reader) {
      this.reader.feed(text, final);
      return;
    }
    let i = 0;
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c === C_LF) {
        this.line++;
        this.lineStart = this.offset + i + 1;
        this.indent = '';
        this.indentTooLong = false;
      } else if (!isJsonWs(c)) {
        break;
      }
      i++;
    }
    if (i >= text.length) {
      // Still only whitespace. Remember the current line's part of it, within reason.
      const lastNl = text.lastIndexOf('\n');
      const tail = lastNl >= 0 ? text.slice(lastNl + 1) : text;
      if (!this.indentTooLong) {
        if (this.indent.length + tail.length > MAX_ENTRY_CHARS) {
          this.indentTooLong = true;
          this.indent = '';
        } else {
          this.indent += tail;
        }
      }
      this.offset += text.length;
      return;
    }
    const lastNl = text.lastIndexOf('\n', i);
    const lineText = lastNl >= 0 ? text.slice(lastNl + 1) : text;
    if (text.charCodeAt(i) === C_LBRACKET) {
      this.format = 'json-array';
      const offset = this.offset + i + 1;
      this.reader = new ArrayReader(this.out, offset, this.line, this.lineStart);
      this.reader.feed(text.slice(i + 1), final);
    } else {
      this.format = 'ndjson';
      this.reader = new NdjsonReader(this.out, this.line, this.indentTooLong);
      this.reader.feed(this.indentTooLong ? text.slice(i) : this.indent + lineText, final);
    }
    this.indent = '';
  }
}

/**
 * Reads a usage file (a JSON array of entries, or NDJSON) and yields its
 * entries in file order, in arrays of at most `batchSize`. Returns the format.
 *
 * Throws UsageFileError when a JSON array is malformed or truncated (after
 * yielding all the entries before the problem), UsageSourceError when the
 * path is not a regular file or a read stalls past `readTimeoutMs`, and the fs
 * error (code 'ENOENT', ...) when the file cannot be read. Bad NDJSON lines do
 * not throw: they are yielded as entries with `error` set.
 */
export async function* readUsageFile(path: string, opts: ReadOptions = {}): AsyncGenerator<RawEntry[], UsageFileFormat> {
  checkBatchSize(opts.batchSize ?? DEFAULT_BATCH_SIZE);
  return yield* readUsageHandle(await openRegularFile(path, opts.readTimeoutMs ?? DEFAULT_READ_TIMEOUT_MS), opts);
}

function checkBatchSize(batchSize: number): void {
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) {
    throw new RangeError(`batchSize must be a positive integer, got ${String(batchSize)}`);
  }
}

/** What readUsageHandle needs of an open file. */
export type UsageFileHandle = Pick<fs.promises.FileHandle, 'read' | 'close'>;

/** readUsageFile over a file already opened (and checked); closes it when done. */
export async function* readUsageHandle(handle: UsageFileHandle, opts: ReadOptions = {}): AsyncGenerator<RawEntry[], UsageFileFormat> {
  const batchSize = opts.batchSize ?? DEFAULT_BATCH_SIZE;
  checkBatchSize(batchSize);
  const readTimeoutMs = opts.readTimeoutMs ?? DEFAULT_READ_TIMEOUT_MS;
  const pending: RawEntry[] = [];
  const detector = new Detector(pending);
  const decoder = new StringDecoder('utf8');
  let atStart = true;
  let taken = 0;

  // Hands out full batches from `pending` without shifting the array each time.
  function* batches(all: boolean): Generator<RawEntry[]> {
    while (pending.length - taken >= batchSize || (all && pending.length > taken)) {
      const n = Math.min(batchSize, pending.length - taken);
      yield pending.slice(taken, taken + n);
      taken += n;
    }
    pending.splice(0, taken);
    taken = 0;
  }

  // On a UsageFileError, every entry before the problem is still yielded, then the error is thrown.
  let failure: UsageFileError | undefined;
  function feedOrFlush(text: string, final: boolean): void {
    try {
      detector.feed(text, final);
    } catch (e) {
      if (!(e instanceof UsageFileError)) throw e;
      failure = e;
    }
  }

  try {
    for await (const chunk of readChunks(handle, readTimeoutMs)) {
      let text = decoder.write(chunk);
      if (atStart && text.length > 0) {
        if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
        atStart = false;
      }
      feedOrFlush(text, false);
      if (failure) break;
      yield* batches(false);
    }
  } finally {
    // Not awaited: closing waits for a read still in flight, and a stalled read may never end.
    void handle.close().catch(() => undefined);
  }
  if (!failure) {
    let text = decoder.end();
    if (atStart && text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    feedOrFlush(text, true);
  }
  yield* batches(true);
  if (failure) throw failure;
  return detector.format;
}
