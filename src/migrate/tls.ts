// Mutual TLS for the migration link, the same in agent mode and stream mode:
// the listening side (destination agent, stream-in) demands a client
// certificate signed by its CA; the connecting side (source agent,
// stream-out) checks the listener's certificate and host name against its CA.

import { readFileSync } from "node:fs";
import type { TlsOptions, ConnectionOptions, TLSSocket } from "node:tls";

export interface TlsFiles {
  cert: string;
  key: string;
  ca: string;
}

function pem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`pagetwin: cannot read the TLS ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

function material(t: TlsFiles): { cert: Buffer; key: Buffer; ca: Buffer } {
  return { cert: pem(t.cert, "certificate"), key: pem(t.key, "private key"), ca: pem(t.ca, "CA certificate") };
}

/** Options for tls.createServer: a client without a certificate from `ca` is refused during the handshake. */
export function tlsServerOptions(t: TlsFiles): TlsOptions {
  return { ...material(t), requestCert: true, rejectUnauthorized: true };
}

/** Options for tls.connect: the server's certificate must come from `ca` and name `host`. */
export function tlsClientOptions(t: TlsFiles, host: string, port: number): ConnectionOptions {
  return { ...material(t), host, port };
}

/**
 * For a server that lets the handshake finish (rejectUnauthorized: false) so
 * that it can say why it refuses a client: the reason, or null when the
 * client's certificate is signed by the CA. Such a server must call this
 * before it reads a byte from the client.
 */
export function unverifiedPeer(sock: TLSSocket): string | null {
  if (sock.authorized) return null;
  const err = sock.authorizationError;
  const why = err instanceof Error ? err.message : String(err ?? "no certificate");
  const cert = sock.getPeerCertificate();
  return cert && Object.keys(cert).length
    ? `its certificate is not signed by the CA this side trusts (${why})`
    : `it presented no certificate (${why})`;
}
