// Cancellation: every long operation takes an AbortSignal and, when it fires,
// rejects with an AbortError (name "AbortError", code "ABORT_ERR", cause the
// signal's reason) after leaving things as they were.

import { AbortError } from "./errors.js";

/** Options of every operation that can be cancelled. */
export interface AbortOptions {
  /** Cancels the operation: it rejects with an {@link AbortError} whose `cause` is `signal.reason`. */
  signal?: AbortSignal | undefined;
}

export function abortError(signal: AbortSignal, what: string): AbortError {
  return new AbortError(`pagetwin: ${what} was aborted`, { cause: signal.reason });
}

export function throwIfAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw abortError(signal, what);
}

/** `p`, or an AbortError as soon as `signal` fires (`p` itself runs on; its outcome is then ignored). */
export function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) {
    p.catch(() => {});
    return Promise.reject(abortError(signal, what));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortError(signal, what));
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/** Runs `onAbort` when `signal` fires; the returned function stops listening. */
export function onAbort(signal: AbortSignal | undefined, onAbort: () => void): () => void {
  if (!signal) return () => {};
  if (signal.aborted) {
    queueMicrotask(onAbort);
    return () => {};
  }
  signal.addEventListener("abort", onAbort, { once: true });
  return () => signal.removeEventListener("abort", onAbort);
}
