/**
 * Occurrence numbers of usage identities (see ./entries.ts): how many times an
 * identity has been seen so far in a file, for the identities that repeat.
 */
import type { IdentityKind } from './entries';

const KIND_TAG: Record<IdentityKind, number> = { e: 1, c: 2, r: 3 };
const WORDS = 5;
const MAX_COUNT = 2 ** 26 - 1;

/**
 * Occurrences of identities seen more than once (or already stored), in typed
 * arrays: 20 bytes a slot (the identity's 132 hash bits and its kind, and the
 * count), open addressing, grown at 70% load. A Map of strings would take
 * ~100 bytes an entry. A file read for the first time leaves it nearly empty;
 * a file read again fills it with one slot per entry.
 */
export class OccurrenceTable {
  private slots: Uint32Array;
  private mask: number;
  private size = 0;
  private readonly key = new Uint32Array(WORDS);

  /** `expected`: how many entries the file probably holds (sized up front so a big file is not copied while growing). */
  constructor(expected = 0) {
    let capacity = 1 << 10;
    while (capacity * 0.7 < expected && capacity < 1 << 24) capacity *= 2;
    this.slots = new Uint32Array(capacity * WORDS);
    this.mask = capacity - 1;
  }

  /**
   * Counts one more occurrence of (kind, hash) and returns its number (1 for
   * the first). `hash` is the identity's base64url text (22 characters, 132
   * bits); an 'e' identity (a producer id) is hashed first.
   */
  next(kind: IdentityKind, hash: Buffer, extraBits: number): number {
    const key = this.key;
    key[0] = hash.readUInt32LE(0);
    key[1] = hash.readUInt32LE(4);
    key[2] = hash.readUInt32LE(8);
    key[3] = hash.readUInt32LE(12);
    const tag = (KIND_TAG[kind] << 4) | extraBits; // 6 bits
    const slots = this.slots;
    let i = key[0] & this.mask;
    for (;;) {
      const at = i * WORDS;
      const last = slots[at + 4];
      if (last === 0) {
        slots[at] = key[0];
        slots[at + 1] = key[1];
        slots[at + 2] = key[2];
        slots[at + 3] = key[3];
        slots[at + 4] = (1 << 6) | tag;
        if (++this.size > this.mask * 0.7) this.grow();
        return 1;
      }
      if ((last & 63) === tag && slots[at] === key[0] && slots[at + 1] === key[1] && slots[at + 2] === key[2] && slots[at + 3] === key[3]) {
        const count = (last >>> 6) + 1;
        if (count > MAX_COUNT) throw new Error(`more than ${MAX_COUNT} identical usage entries in one file`);
        slots[at + 4] = ((count << 6) | tag) >>> 0;
        return count;
      }
      i = (i + 1) & this.mask;
    }
  }

  private grow(): void {
    const old = this.slots;
    const capacity = (this.mask + 1) * 2;
    this.slots = new Uint32Array(capacity * WORDS);
    this.mask = capacity - 1;
    for (let at = 0; at < old.length; at += WORDS) {
      if (old[at + 4] === 0) continue;
      let i = old[at] & this.mask;
      while (this.slots[i * WORDS + 4] !== 0) i = (i + 1) & this.mask;
      this.slots.set(old.subarray(at, at + WORDS), i * WORDS);
    }
  }
}

const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

/** The 132 bits of a 22-character base64url digest: 16 bytes and the last character's low 4 bits. */
export function digestBits(text: string): { bytes: Buffer; extra: number } {
  return { bytes: Buffer.from(text, 'base64url'), extra: B64.indexOf(text[21]) & 15 };
}
