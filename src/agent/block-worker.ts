// The destination's NAS reader on a thread of its own: it reads the blocks
// of a Refs frame from the image, hashes them and compares each with the
// page hash the source sent (BlockVerifier, as on the agent's own thread),
// and hands back the verdicts and the blocks' bytes. The agent's thread goes
// on taking frames meanwhile: a scattered twin costs a read system call,
// and on the thread that also decrypts and writes pages those add up.

import { parentPort } from "node:worker_threads";
import { createEngine, HASH_SIZE, PAGE_SIZE } from "../core/engine.js";
import { openDisk } from "../adapters/nas/disk.js";
import { BlockVerifier } from "../adapters/nas/verify.js";
import type { DiskFormat } from "../adapters/nas/image.js";

export type BlockWorkerRequest =
  | { kind: "open"; imagePath: string; format: DiskFormat | null; seed: string }
  | { kind: "verify"; id: number; blocks: Uint32Array; hashes: Uint8Array }
  /** A `pages` buffer of a reply, back to be filled again (a fresh 8 MiB buffer costs its page faults: more than the copy into it). */
  | { kind: "give"; buffer: ArrayBuffer }
  | { kind: "close" };

export type BlockWorkerReply =
  | { kind: "opened"; error?: string }
  | { kind: "verified"; id: number; ok: Uint8Array; pages: Uint8Array; error?: string };

/** Buffers for replies' pages, used again. */
const SPARE_MAX = 8;
const spare: ArrayBuffer[] = [];
let verifier: BlockVerifier | null = null;
let close = () => {};

async function open(m: Extract<BlockWorkerRequest, { kind: "open" }>): Promise<void> {
  close();
  const engine = await createEngine({ seed: BigInt(m.seed) });
  const image = openDisk(m.imagePath, { format: m.format });
  const v = (verifier = new BlockVerifier(engine, image));
  close = () => { v.free(); image.close(); verifier = null; close = () => {}; };
}

function verify(m: Extract<BlockWorkerRequest, { kind: "verify" }>): Extract<BlockWorkerReply, { kind: "verified" }> {
  if (!verifier) throw new Error("no image is open");
  const n = m.blocks.length;
  const ok = verifier.verify(m.blocks, (i) => m.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE));
  // out of the core's memory into a buffer of its own, which moves to the agent's thread without a copy
  const bytes = n * PAGE_SIZE;
  const i = spare.findIndex((b) => b.byteLength >= bytes);
  const pages = new Uint8Array(i >= 0 ? spare.splice(i, 1)[0]! : new ArrayBuffer(Math.max(bytes, 2048 * PAGE_SIZE)), 0, bytes);
  pages.set(verifier.slots(n));
  return { kind: "verified", id: m.id, ok: Uint8Array.from(ok, (b) => (b ? 1 : 0)), pages };
}

if (parentPort) {
  const port = parentPort;
  port.on("message", (m: BlockWorkerRequest) => {
    if (m.kind === "open") {
      open(m).then(() => port.postMessage({ kind: "opened" }), (e: Error) => port.postMessage({ kind: "opened", error: e.message }));
    } else if (m.kind === "verify") {
      let r: Extract<BlockWorkerReply, { kind: "verified" }>;
      try { r = verify(m); } catch (e) { r = { kind: "verified", id: m.id, ok: new Uint8Array(0), pages: new Uint8Array(0), error: (e as Error).message }; }
      port.postMessage(r, r.pages.length ? [r.pages.buffer as ArrayBuffer] : []);
    } else if (m.kind === "give") {
      if (spare.length < SPARE_MAX) spare.push(m.buffer);
    } else close();
  });
  // the core compiles now, before a source connects (the first session's engine then costs ~1 ms)
  void createEngine({ seed: 0n }).catch(() => {});
}
