// Every timeout of the link, in one place, so both modes wait alike.

export const TIMEOUTS = {
  /** TCP connect plus the TLS handshake, at the side that dials. */
  connectMs: 10_000,
  /** From accept to an authenticated peer (the TLS handshake), at the side that listens. */
  authMs: 10_000,
  /** An authenticated peer's HELLO, and the HELLO_ACK answering it. */
  helloMs: 15_000,
  /** A peer that sends nothing for this long after the handshake is dropped. */
  idleMs: 120_000,
  /** Waiting for an answer the protocol owes (an iteration's ack, the verdict at switchover). */
  answerMs: 120_000,
  /** After a failure, how long the peer may still read our Abort before the socket is destroyed. */
  abortLingerMs: 1_000,
  /** A refused peer gets this long to read why, then its socket is destroyed. */
  refuseLingerMs: 150,
  /** After a clean end, how long the peer gets to close its side before the socket is dropped. */
  closeWaitMs: 5_000,
  /** After the last connection of a migration ends, how long a late channel (multifd) may still arrive. */
  lastChannelGraceMs: 200,
  /** TCP keepalive probes start after this much silence (a vanished host is noticed). */
  keepAliveMs: 15_000,
} as const;

/** Unauthenticated connections a listener holds at once; more are dropped at accept. */
export const MAX_PENDING_HANDSHAKES = 8;
