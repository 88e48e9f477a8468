// How a link is protected. Every byte after the handshake travels inside TLS:
//   certificates  TLS 1.3, mutual: each side checks the other's certificate
//                 against its CA (the dialer also checks the host name);
//   key file      TLS-PSK (RFC 4279/5489): ECDHE-PSK with ChaCha20-Poly1305,
//                 forward secret, both ends prove the key inside TLS itself;
//   insecure      plain TCP, only when the operator says --insecure.
// Nothing here is our own cryptography: OpenSSL does all of it through Node's tls.

import { randomBytes } from "node:crypto";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import type { Socket } from "node:net";
import type { ConnectionOptions, TlsOptions, TLSSocket } from "node:tls";
import { SecurityError } from "../errors.js";

export interface TlsFiles {
  cert: string;
  key: string;
  ca: string;
}

export type Security =
  | { kind: "tls"; files: TlsFiles }
  | { kind: "psk"; key: Buffer }
  | { kind: "insecure" };

/** What a caller may pass: a key, certificates, or an explicit `insecure`. */
export interface SecurityOptions {
  psk?: Uint8Array | null;
  tls?: TlsFiles | null;
  insecure?: boolean;
}

/** Bytes a pre-shared key must have: 256 random bits. */
export const PSK_BYTES = 32;
const PSK_IDENTITY = "pagetwin";
// TLS 1.2 is the only version in which OpenSSL negotiates a plain PSK; this
// suite has an ephemeral ECDH share (forward secrecy) and an AEAD
const PSK_CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305";

/** The one Security the options name; `who` is the command or API in errors. */
export function resolveSecurity(o: SecurityOptions, who: string): Security {
  const psk = o.psk ?? null;
  const tls = o.tls ?? null;
  if (psk && tls) throw new SecurityError(`${who}: give either a pre-shared key or TLS certificates, not both`);
  if (tls) return { kind: "tls", files: tls };
  if (psk) {
    if (psk.length !== PSK_BYTES) throw new SecurityError(`${who}: a pre-shared key must be ${PSK_BYTES} random bytes (got ${psk.length}); make one with: head -c 32 /dev/urandom > key; chmod 600 key`);
    return { kind: "psk", key: Buffer.from(psk) };
  }
  if (o.insecure) return { kind: "insecure" };
  throw new SecurityError(`${who}: the link has no protection: give --psk-file KEY (the same 32-byte file at both ends) or --tls-cert/--tls-key/--tls-ca, ` +
    `or --insecure to run without authentication or encryption (anyone who reaches the port could write guest RAM)`);
}

/** Refuses a secret file that others can read (or that cannot be read). */
function readSecret(path: string, what: string): Buffer {
  let data: Buffer;
  let mode: number;
  try {
    data = readFileSync(path);
    mode = statSync(path).mode;
  } catch (err) {
    throw new SecurityError(`pagetwin: cannot read the ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if ((mode & 0o077) !== 0) throw new SecurityError(`pagetwin: the ${what} ${path} can be read by group or others (mode ${(mode & 0o777).toString(8)}): chmod 600 ${path}`);
  return data;
}

/** Reads a key file: exactly 32 bytes, readable by its owner only. */
export function loadKey(path: string): Buffer {
  const key = readSecret(path, "key file");
  if (key.length !== PSK_BYTES) {
    throw new SecurityError(`pagetwin: the key file ${path} holds ${key.length} bytes; it must hold ${PSK_BYTES} random bytes: head -c 32 /dev/urandom > ${path}; chmod 600 ${path}`);
  }
  return key;
}

function pem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new SecurityError(`pagetwin: cannot read the TLS ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

function material(t: TlsFiles): { cert: Buffer; key: Buffer; ca: Buffer } {
  return { cert: pem(t.cert, "certificate"), key: readSecret(t.key, "TLS private key"), ca: pem(t.ca, "CA certificate") };
}

/** Reads every file the security names now, so that a bad file is reported at start, not at the first peer. */
export function checkSecurity(s: Security): void {
  if (s.kind === "tls") material(s.files);
}

/**
 * tls.createServer options. With certificates the handshake may finish for a
 * peer whose certificate is from another CA, so that it can be told why it is
 * refused (unverifiedPeer); not a byte of such a peer is read.
 */
export function serverOptions(s: Security): TlsOptions {
  if (s.kind === "tls") return { ...material(s.files), minVersion: "TLSv1.3", requestCert: true, rejectUnauthorized: false };
  if (s.kind === "psk") {
    return {
      minVersion: "TLSv1.2", maxVersion: "TLSv1.2", ciphers: PSK_CIPHERS,
      pskCallback: (_sock, identity) => (identity === PSK_IDENTITY ? s.key : null),
    };
  }
  throw new Error("serverOptions: an insecure link has no TLS");
}

/** tls.connect options: the listener's certificate must come from the CA and name `host`; or the same key. */
export function clientOptions(s: Security, host: string): ConnectionOptions {
  if (s.kind === "tls") return { ...material(s.files), minVersion: "TLSv1.3", servername: isIp(host) ? undefined : host, host };
  if (s.kind === "psk") {
    return {
      minVersion: "TLSv1.2", maxVersion: "TLSv1.2", ciphers: PSK_CIPHERS,
      pskCallback: () => ({ psk: s.key, identity: PSK_IDENTITY }),
      // the key authenticates the server: there is no certificate to check
      checkServerIdentity: () => undefined,
    };
  }
  throw new Error("clientOptions: an insecure link has no TLS");
}

function isIp(host: string): boolean {
  return /^[\d.]+$/.test(host) || host.includes(":");
}

/**
 * For a listener: the reason to refuse a TLS peer whose certificate did not
 * check out, or null. Called before a byte of the peer is read.
 */
export function unverifiedPeer(sock: TLSSocket, s: Security): string | null {
  if (s.kind !== "tls" || sock.authorized) return null;
  const err = sock.authorizationError;
  const why = err instanceof Error ? err.message : String(err ?? "no certificate");
  const cert = sock.getPeerCertificate();
  return cert && Object.keys(cert).length
    ? `its certificate is not signed by the CA this side trusts (${why})`
    : `it presented no certificate (${why})`;
}

/** Whether `sock` is a TLS connection (every record authenticated, a changed one refused): frames inside need no CRC of their own. */
export function isTls(sock: Socket): boolean {
  return (sock as TLSSocket).encrypted === true;
}

/** What an end run with --insecure says on its log, once. */
export const INSECURE_WARNING = "WARNING: --insecure: this link authenticates nobody and encrypts nothing";

/** One line for logs and --json: what protects the link. */
export function describeSecurity(s: Security): string {
  if (s.kind === "tls") return "TLS 1.3, mutual certificates";
  if (s.kind === "psk") return "TLS 1.2 PSK (ECDHE-PSK-CHACHA20-POLY1305)";
  return "none (--insecure): not authenticated, not encrypted";
}

/** Writes a new key file: 32 random bytes, mode 0600, refusing to overwrite anything (the path is returned). */
export function createKeyFile(path: string): string {
  writeFileSync(path, randomBytes(PSK_BYTES), { mode: 0o600, flag: "wx" });
  return path;
}
