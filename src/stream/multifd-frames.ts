// MREFS (type 15, out->in): twin pages of a multifd channel, as references.
//   u8 QEMU's multifd channel id, u32 first seq, u32 count (<= MAX_REFS),
//   then per page: u32 block, 16-byte hash.
// A multifd page has no record header of its own (the packet header before
// it travels raw), so an entry is 20 bytes. The channel id lets stream-in
// check that every reference of a session belongs to the one channel it
// rebuilds.

import { TRAILER, ProtocolError, seal, type Frame } from "../wire/envelope.js";
import { HASH_BYTES, MAX_REFS, SFrame, type Ref } from "./frames.js";
import { HEAP_ALLOC, type FrameAlloc } from "./write-ring.js";

const ENTRY = 4 + HASH_BYTES;
const HEAD = 5 + 1 + 4 + 4; // length, type, channel, first seq, count
const EMPTY = Buffer.alloc(0);

/** Same use as RefsBuilder: add() references in order, take() the sealed frame. */
export class MultifdRefsBuilder {
  private readonly buf = Buffer.allocUnsafe(HEAD + MAX_REFS * ENTRY + TRAILER);
  private o = HEAD;
  count = 0;
  firstSeq = 0;

  /** `channel()`: QEMU's id of the channel, known once its initial packet was read. */
  constructor(private readonly channel: () => number) {}

  add(seq: number, header: Uint8Array, block: number, hash: Uint8Array): void {
    if (header.length !== 0) throw new RangeError("a multifd page has no record header");
    if (this.count >= MAX_REFS) throw new RangeError(`an MREFS frame holds at most ${MAX_REFS} references`);
    if (this.count === 0) this.firstSeq = seq;
    this.buf.writeUInt32BE(block, this.o);
    this.buf.set(hash, this.o + 4);
    this.o += ENTRY;
    this.count++;
  }

  /** The finished frame (a copy; `crc` false: without its CRC); the builder is empty again. */
  take(alloc: FrameAlloc = HEAP_ALLOC, crc = true): Buffer {
    const b = this.buf;
    const id = this.channel();
    if (id < 0 || id > 255) throw new RangeError(`multifd channel id ${id}`);
    b[4] = SFrame.MultifdRefs;
    b[5] = id;
    b.writeUInt32BE(this.firstSeq, 6);
    b.writeUInt32BE(this.count, 10);
    const out = alloc.take(this.o + TRAILER);
    b.copy(out, 0, 0, this.o);
    this.o = HEAD;
    this.count = 0;
    return seal(out, crc);
  }
}

export function decodeMultifdRefs(f: Frame): { channel: number; firstSeq: number; refs: Ref[] } {
  const p = f.payload;
  if (p.length < 9) throw new ProtocolError(`MREFS frame of ${p.length} bytes is too short`);
  const count = p.readUInt32BE(5);
  if (count > MAX_REFS) throw new ProtocolError(`an MREFS frame says ${count} references; at most ${MAX_REFS}`);
  if (p.length !== 9 + count * ENTRY) throw new ProtocolError(`MREFS frame of ${p.length} bytes for ${count} references (${9 + count * ENTRY} expected)`);
  const refs: Ref[] = [];
  for (let i = 0, o = 9; i < count; i++, o += ENTRY) {
    refs.push({ header: EMPTY, block: p.readUInt32BE(o), hash: p.subarray(o + 4, o + ENTRY) });
  }
  return { channel: p[0]!, firstSeq: p.readUInt32BE(1), refs };
}
