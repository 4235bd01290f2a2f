import { frameLengthWatcher } from '../../src/grpc/streams';

/** A gRPC frame prefix (flag byte + 4-byte big-endian length) followed by `body` bytes. */
function frame(declared: number, body = declared): Buffer {
  const prefix = Buffer.alloc(5);
  prefix.writeUInt32BE(declared, 1);
  return Buffer.concat([prefix, Buffer.alloc(body)]);
}

function feed(limit: number, chunks: Buffer[]): number[] {
  const seen: number[] = [];
  const watch = frameLengthWatcher(limit, (declared) => seen.push(declared));
  for (const chunk of chunks) watch(chunk);
  return seen;
}

/** The same bytes cut into pieces of `size`. */
const pieces = (bytes: Buffer, size: number): Buffer[] =>
  Array.from({ length: Math.ceil(bytes.length / size) }, (_, i) => bytes.subarray(i * size, (i + 1) * size));

describe('frameLengthWatcher (the open-service request size check)', () => {
  it('accepts messages up to the limit, several in one chunk', () => {
    expect(feed(100, [Buffer.concat([frame(100), frame(0), frame(7)])])).toEqual([]);
  });

  it('reports the first declared length over the limit, once, before its body arrives', () => {
    expect(feed(100, [Buffer.concat([frame(10), frame(101, 0)])])).toEqual([101]);
    expect(feed(100, [frame(5000, 3), frame(6000)])).toEqual([5000]);
  });

  it('finds the prefixes however the bytes are split, down to one byte at a time', () => {
    const bytes = Buffer.concat([frame(3), frame(100), frame(2), frame(70_000, 10)]);
    for (const size of [1, 2, 4, 5, 6, 7, 13, 64, bytes.length]) {
      expect({ size, seen: feed(100, pieces(bytes, size)) }).toEqual({ size, seen: [70_000] });
    }
  });
});
