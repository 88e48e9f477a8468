// stream-in's rebuild of one REFS (or MREFS) frame, socket-free: every
// reference's block read from the NAS and verified against the page's hash,
// and the frame's stream put together: each record header, then its page's
// 4096 bytes. A page whose block did not verify is left for the session to
// fill from stream-out's resend (ok[i] false). Runs on the session's thread,
// or in a rebuild worker (rebuild-pool.ts).

import { PAGE_SIZE } from "../core/engine.js";
import { ProtocolError, type Frame } from "../wire/envelope.js";
import { MAX_REFS, SFrame, decodeRefs, type Ref } from "./frames.js";
import { decodeMultifdRefs } from "./multifd-frames.js";
import type { PageVerifier } from "./disks.js";
import type { FrameAlloc } from "./write-ring.js";

export interface RefsFrame {
  firstSeq: number;
  refs: Ref[];
  /** QEMU's multifd channel id (MREFS only). */
  channel?: number;
}

/** A REFS or MREFS frame's references, at most MAX_REFS. */
export function decodeRefsFrame(f: Frame): RefsFrame {
  const r = f.type === SFrame.MultifdRefs ? decodeMultifdRefs(f) : decodeRefs(f);
  if (r.refs.length > MAX_REFS) throw new ProtocolError(`a REFS frame holds ${r.refs.length} references; at most ${MAX_REFS}`);
  return r;
}

export interface Rebuilt {
  /** Each reference's header and page, in order (the page of a block that did not verify: to fill). */
  out: Buffer;
  ok: boolean[];
}

/** The bytes a frame's references rebuild to. */
export function rebuiltSize(refs: readonly Ref[]): number {
  let size = 0;
  for (const ref of refs) size += ref.header.length + PAGE_SIZE;
  return size;
}

export function rebuildRefs(verifier: PageVerifier, refs: readonly Ref[], alloc: FrameAlloc): Rebuilt {
  const n = refs.length;
  const ok = verifier.verify(refs.map((r) => r.block), (i) => refs[i]!.hash);
  const out = alloc.take(rebuiltSize(refs));
  const pages = verifier.slots(n);
  let o = 0;
  for (let i = 0; i < n; i++) {
    const ref = refs[i]!;
    out.set(ref.header, o);
    o += ref.header.length;
    if (ok[i]) out.set(pages.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), o);
    o += PAGE_SIZE;
  }
  return { out, ok };
}
