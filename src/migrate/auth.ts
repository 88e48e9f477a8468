// Mutual challenge-response with a pre-shared key: each side proves it holds
// the key by an HMAC-SHA256 over both sides' fresh nonces, with its role
// mixed in so one side's proof cannot be replayed as the other's. The key
// itself never crosses the link.
//
// The exchange, the same in agent mode (source -> destination) and stream
// mode (stream-out -> stream-in); only the frames that carry it differ:
//   initiator HELLO {auth: "psk", nonce: Ni}
//   responder challenge {nonce: Nr, proof: HMAC(responder, Nr, Ni)}
//   initiator checks it, answers {proof: HMAC(initiator, Ni, Nr)}
//   responder checks it; only then does it open anything.

import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync, statSync } from "node:fs";

export type Role = "source" | "destination";

/** Agent mode's label; stream mode mixes in its own so a proof from one mode is worthless in the other. */
export const AGENT_AUTH_CONTEXT = "pagetwin-v2";

export function newNonce(): string {
  return randomBytes(32).toString("hex");
}

export function proof(key: Uint8Array, role: Role, mine: string, theirs: string, context = AGENT_AUTH_CONTEXT): string {
  return createHmac("sha256", key).update(`${context}/${role}/${mine}/${theirs}`).digest("hex");
}

export function proofMatches(key: Uint8Array, role: Role, mine: string, theirs: string, got: unknown, context = AGENT_AUTH_CONTEXT): boolean {
  if (typeof got !== "string" || !/^[0-9a-f]{64}$/.test(got)) return false;
  return timingSafeEqual(Buffer.from(proof(key, role, mine, theirs, context), "hex"), Buffer.from(got, "hex"));
}

export function validNonce(n: unknown): n is string {
  return typeof n === "string" && /^[0-9a-f]{64}$/.test(n);
}

/** How the two ends are named in messages ("source"/"destination", "stream-out"/"stream-in"). */
export interface AuthNames {
  initiator: string;
  responder: string;
  context?: string;
}

/** What an initiator puts in its HELLO. */
export interface AuthHello {
  auth: "psk" | null;
  nonce: string | null;
}

/** The side that connects (source agent, stream-out): it must not send anything before the responder has proved the key. */
export class PskInitiator {
  private readonly nonce: string | null;

  constructor(private readonly key: Uint8Array | null, private readonly names: AuthNames) {
    this.nonce = key ? newNonce() : null;
  }

  get required(): boolean {
    return this.key !== null;
  }

  hello(): AuthHello {
    return { auth: this.key ? "psk" : null, nonce: this.nonce };
  }

  /** Checks the responder's challenge; returns the answer to send, or the reason to refuse the responder. */
  answer(challenge: { nonce?: unknown; proof?: unknown }): { ok: true; proof: string } | { ok: false; error: string } {
    const { key, nonce, names } = this;
    if (!key || !nonce) throw new Error("PskInitiator.answer without a key");
    if (!validNonce(challenge.nonce) || !proofMatches(key, "destination", challenge.nonce, nonce, challenge.proof, names.context)) {
      return { ok: false, error: `the ${names.responder} did not prove it holds the pre-shared key: refusing to send it any memory` };
    }
    return { ok: true, proof: proof(key, "source", nonce, challenge.nonce, names.context) };
  }
}

/** The side that listens (destination agent, stream-in): it opens nothing before the initiator has proved the key. */
export class PskResponder {
  private peerNonce = "";
  private nonce = "";

  constructor(private readonly key: Uint8Array | null, private readonly names: AuthNames) {}

  get required(): boolean {
    return this.key !== null;
  }

  /** Why this HELLO is refused (a key on one side only), or null. */
  refusal(hello: { auth?: unknown; nonce?: unknown }): string | null {
    const { initiator, responder } = this.names;
    if (this.key) {
      if (hello.auth !== "psk" || !validNonce(hello.nonce)) return `this ${responder} requires a pre-shared key: start the ${initiator} with the same --psk-file`;
      this.peerNonce = hello.nonce;
      return null;
    }
    if (hello.auth) return `the ${initiator} wants a pre-shared key, but this ${responder} has none: start it with the same --psk-file`;
    return null;
  }

  /** The challenge: a fresh nonce and this side's proof (after refusal() said null, with a key). */
  challenge(): { nonce: string; proof: string } {
    if (!this.key || !this.peerNonce) throw new Error("PskResponder.challenge before a HELLO with a key");
    this.nonce = newNonce();
    return { nonce: this.nonce, proof: proof(this.key, "destination", this.nonce, this.peerNonce, this.names.context) };
  }

  /** Why the initiator's answer is refused, or null when it proved the key. */
  check(answer: { proof?: unknown }): string | null {
    if (!this.key || !this.nonce) throw new Error("PskResponder.check before challenge");
    if (proofMatches(this.key, "source", this.peerNonce, this.nonce, answer.proof, this.names.context)) return null;
    return `authentication failed: the ${this.names.initiator} does not hold this ${this.names.responder}'s pre-shared key`;
  }
}

/** Reads a key file (at least 16 bytes; make one with `head -c 32 /dev/urandom > key`). */
export function loadKey(path: string): Uint8Array {
  let key: Buffer;
  try {
    key = readFileSync(path);
  } catch (err) {
    throw new Error(`pagetwin: cannot read the key file ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (key.length < 16) throw new Error(`pagetwin: the key file ${path} holds ${key.length} bytes; use at least 16 random bytes (head -c 32 /dev/urandom > ${path})`);
  if ((statSync(path).mode & 0o077) !== 0) process.emitWarning(`pagetwin: the key file ${path} is readable by others; chmod 600 it`);
  return key;
}
