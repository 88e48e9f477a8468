// The agent's side of its NAS reader thread (block-worker.ts): started with
// the agent, before any source connects (a thread and the core take tens of
// milliseconds to start); opened on a session's image and seed; asked to
// fetch and verify one Refs frame's blocks at a time, answers in order.

import { Worker } from "node:worker_threads";
import type { DiskFormat } from "../adapters/nas/image.js";
import type { BlockWorkerReply, BlockWorkerRequest } from "./block-worker.js";

export interface FetchedBlocks {
  /** ok[i] 1: block i was read whole and hashes to the page hash sent with it. */
  ok: Uint8Array;
  /** The blocks' bytes, block i at i * PAGE_SIZE. */
  pages: Uint8Array;
}

type Waiter<T> = { resolve: (v: T) => void; reject: (e: Error) => void };

export class BlockFetcher {
  private readonly worker: Worker;
  private opening: Waiter<void> | null = null;
  private readonly waiting = new Map<number, Waiter<FetchedBlocks>>();
  private nextId = 0;
  private failure: Error | null = null;

  constructor() {
    this.worker = new Worker(new URL("./block-worker.js", import.meta.url));
    this.worker.unref(); // an idle reader never keeps the agent's process alive
    this.worker.on("message", (m: BlockWorkerReply) => this.reply(m));
    this.worker.on("error", (e) => this.fail(new Error(`the NAS reader thread failed: ${e.message}`)));
    this.worker.on("exit", () => this.fail(new Error("the NAS reader thread exited")));
  }

  /** Opens `imagePath` (as indexed: `format`) with the index's seed; rejects if the thread cannot. */
  open(imagePath: string, format: DiskFormat | null, seed: bigint): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const p = new Promise<void>((resolve, reject) => (this.opening = { resolve, reject }));
    this.post({ kind: "open", imagePath, format, seed: seed.toString() });
    return p;
  }

  /** Reads and verifies `blocks[i]` against `hashes[16i..16i+16)`; the arrays move to the thread (do not use them after). */
  verify(blocks: Uint32Array, hashes: Uint8Array): Promise<FetchedBlocks> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    const p = new Promise<FetchedBlocks>((resolve, reject) => this.waiting.set(id, { resolve, reject }));
    this.post({ kind: "verify", id, blocks, hashes }, [blocks.buffer as ArrayBuffer, hashes.buffer as ArrayBuffer]);
    return p;
  }

  /** Hands a reply's `pages` back once written, to be filled again. */
  give(pages: Uint8Array): void {
    if (!this.failure) this.post({ kind: "give", buffer: pages.buffer as ArrayBuffer }, [pages.buffer as ArrayBuffer]);
  }

  /** Closes the session's image (the thread stays for the next session). */
  release(): void {
    if (!this.failure) this.post({ kind: "close" });
  }

  /** Ends the thread. */
  async terminate(): Promise<void> {
    this.fail(new Error("the NAS reader thread was stopped"));
    await this.worker.terminate();
  }

  private post(m: BlockWorkerRequest, transfer: ArrayBuffer[] = []): void {
    this.worker.postMessage(m, transfer);
  }

  private reply(m: BlockWorkerReply): void {
    if (m.kind === "opened") {
      const w = this.opening;
      this.opening = null;
      if (m.error) w?.reject(new Error(m.error));
      else w?.resolve();
      return;
    }
    const w = this.waiting.get(m.id);
    this.waiting.delete(m.id);
    if (m.error) w?.reject(new Error(`the NAS reader thread could not verify blocks: ${m.error}`));
    else w?.resolve({ ok: m.ok, pages: m.pages });
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    this.opening?.reject(e);
    this.opening = null;
    for (const w of this.waiting.values()) w.reject(e);
    this.waiting.clear();
  }
}
