// stream-in's trace of one session: it parses the stream it rebuilds for the
// destination QEMU (byte for byte the stream the source QEMU sent) and tells
// the session's tracer how each page arrived: in full (RAW frames), as a
// reference verified against the NAS, or as a reference sent again in full.
// A stream the parser cannot follow only stops the trace's page map.

import { QemuStreamParser, type Piece } from "../stream/qemu-stream.js";
import { MultifdStreamParser } from "../stream/multifd-stream.js";
import type { StreamTraceHook } from "./stream.js";

export class RebuiltStreamTrace {
  private readonly parser: QemuStreamParser | MultifdStreamParser;
  private broken = false;

  constructor(private readonly hook: StreamTraceHook, multifd: boolean) {
    if (multifd) this.parser = new MultifdStreamParser();
    else {
      const p = new QemuStreamParser();
      // what it reads (rebuilt pages, RAW frames) is stream-in's memory, used again once QEMU's socket took it
      p.inputReused = true;
      hook.attach(p);
      this.parser = p;
    }
  }

  /** Bytes that came in full (a RAW frame's, decompressed). */
  raw(buf: Buffer): void {
    for (const p of this.pages(buf)) this.hook.page(false, p.block, p.offset);
  }

  /** A REFS frame rebuilt: each page a reference #firstSeq+i; those at `resent` came again in full. */
  refs(buf: Buffer, firstSeq: number, resent: readonly number[]): void {
    for (const p of this.pages(buf)) this.hook.page(true, p.block, p.offset);
    for (const k of resent) this.hook.resend(firstSeq + k);
  }

  end(error?: string): Promise<void> {
    return this.hook.end(error);
  }

  private pages(buf: Buffer): Extract<Piece, { kind: "page" }>[] {
    if (this.broken) return [];
    try {
      return this.parser.push(buf).filter((p): p is Extract<Piece, { kind: "page" }> => p.kind === "page");
    } catch {
      this.broken = true;
      return [];
    }
  }
}
