// A NAS image and a RAM file with known page classes, for CLI tests: every
// fifth page group holds copies of image blocks (twins), zero pages, and pages
// of text (they compress, as real anonymous memory often does).
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import { writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";

export interface Fixture { image: string; ram: string; pages: number; twin: number; zero: number; normal: number }

const WORDS = "the quick brown fox jumps over a lazy dog while page block twin migration memory kernel buffer cache inode dentry socket".split(" ");

/** Page p: p % 5 of 0, 1 -> a copy of image block p; 2 -> zero; 3, 4 -> text. */
export function makeFixture(dir: string, mib: number): Fixture {
  const pages = mib * 256;
  const img = randomBytes(pages * 4096);
  const ram = Buffer.alloc(pages * 4096);
  const rnd = Math.random;
  let twin = 0, zero = 0, normal = 0;
  for (let p = 0; p < pages; p++) {
    const r = p % 5;
    if (r < 2) { img.copy(ram, p * 4096, p * 4096, (p + 1) * 4096); twin++; continue; }
    if (r === 2) { zero++; continue; }
    let s = "";
    while (s.length < 4096) s += `${WORDS[Math.floor(rnd() * WORDS.length)]}${Math.floor(rnd() * 1e9).toString(36)} `;
    ram.write(s.slice(0, 4096), p * 4096, "latin1");
    normal++;
  }
  const f = { image: join(dir, "disk.img"), ram: join(dir, "ram.bin"), pages, twin, zero, normal };
  writeFileSync(f.image, img);
  writeFileSync(f.ram, ram);
  return f;
}
