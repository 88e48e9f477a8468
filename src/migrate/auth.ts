// Mutual challenge-response with a pre-shared key: each side proves it holds
// the key by an HMAC-SHA256 over both sides' fresh nonces, with its role
// mixed in so one side's proof cannot be replayed as the other's. The key
// itself never crosses the link.

import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync, statSync } from "node:fs";

export type Role = "source" | "destination";

export function newNonce(): string {
  return randomBytes(32).toString("hex");
}

export function proof(key: Uint8Array, role: Role, mine: string, theirs: string): string {
  return createHmac("sha256", key).update(`pagetwin-v2/${role}/${mine}/${theirs}`).digest("hex");
}

export function proofMatches(key: Uint8Array, role: Role, mine: string, theirs: string, got: unknown): boolean {
  if (typeof got !== "string" || !/^[0-9a-f]{64}$/.test(got)) return false;
  return timingSafeEqual(Buffer.from(proof(key, role, mine, theirs), "hex"), Buffer.from(got, "hex"));
}

export function validNonce(n: unknown): n is string {
  return typeof n === "string" && /^[0-9a-f]{64}$/.test(n);
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
