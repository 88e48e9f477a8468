// What the test guest (scripts/build-guest.sh) says on its serial console.

/** The last "pagetwin-counter N" in a serial log, or -1. */
export function lastCounter(serial: string): number {
  let last = -1;
  for (const m of serial.matchAll(/pagetwin-counter (\d+)/g)) last = Number(m[1]);
  return last;
}

/** The first "pagetwin-counter N" in a serial log, or -1. */
export function firstCounter(serial: string): number {
  const m = /pagetwin-counter (\d+)/.exec(serial);
  return m ? Number(m[1]) : -1;
}

/** Bytes the guest read from its disk into the page cache ("pagetwin-read-bytes N"), or -1. */
export function readBytes(serial: string): number {
  const m = /pagetwin-read-bytes (\d+)/.exec(serial);
  return m ? Number(m[1]) : -1;
}

/** What the guest kernel prints when it fails: a panic, an oops, a BUG, a stack-protector or protection fault. */
const FAILURE_RE = /Kernel panic|Oops|BUG:|general protection fault|stack-protector|Attempted to kill/;

/** The guest kernel's failure text (from a little before its first line to the log's end, at most `max` characters), or undefined. */
export function kernelFailure(serial: string, max = 6000): string | undefined {
  const m = FAILURE_RE.exec(serial);
  if (!m) return undefined;
  // the oops header often starts a few lines before the matched line
  const from = Math.max(0, serial.lastIndexOf("\n", Math.max(0, m.index - 400)));
  return serial.slice(from, from + max).trim();
}

/** True if the counters in a serial log ever go backwards (the guest started again). */
export function counterRestarted(serial: string): boolean {
  let last = -1;
  for (const m of serial.matchAll(/pagetwin-counter (\d+)/g)) {
    const n = Number(m[1]);
    if (n < last) return true;
    last = n;
  }
  return false;
}
