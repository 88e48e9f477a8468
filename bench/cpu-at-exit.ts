// Preloaded (`node --import`) into the processes bench/stream-replay.ts measures:
// at exit, writes the CPU the process used (user + system, µs) as one line on
// stderr, so the bench reads it after the process has ended.
import { writeSync } from "node:fs";

process.on("exit", () => {
  const u = process.cpuUsage();
  writeSync(2, `\npagetwin-bench-cpu ${JSON.stringify({ user: u.user, system: u.system })}\n`);
});
