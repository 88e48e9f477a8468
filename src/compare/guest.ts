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
