// Mutation testing (`npm run mutate`, not run in CI): StrykerJS mutates the
// TypeScript in src/, builds the mutated tree once with tsc (mutants are
// switched at run time, not rebuilt), and drives a focused set of node:test
// files over dist/ for each mutant. One target per run, so that a run fits
// on a small machine: MUTATE=<target> npm run mutate (see docs/TESTING.md).
// The targets are the modules that carry pagetwin's guarantees.

const node = (files, pattern, flags = "") =>
  `node --test --test-concurrency=1${flags}${pattern ? ` --test-name-pattern="${pattern}"` : ""} ${files.map((f) => `dist/test/${f}.test.js`).join(" ")}`;

/** Per target: what is mutated (files, or file:line ranges) and the tests that must kill it. */
export const targets = {
  "replay-window": { mutate: ["src/stream/replay-window.ts"], command: node(["replay-window"]) },
  convergence: { mutate: ["src/plan/convergence.ts"], command: node(["planner"]) },
  // the planner's joins: the bit-vector logic that sorts dirty pages into send / map / zero (planWindow to
  // recordSent), and collect(), which joins the windows' plans into one iteration's
  planner: { mutate: ["src/plan/planner.ts:129-212", "src/plan/planner.ts:277-294"], command: node(["planner"]) },
  // the destination's verification: Refs check, what is held, the verdict at switchover
  destination: { mutate: ["src/agent/destination.ts:210-255", "src/agent/destination.ts:336-396"], command: node(["verdict"]) },
  // stream-in's rebuild of REFS frames, NEED/RESEND, the end-to-end check at END: onResend, step()'s
  // dispatch and END, toQemu()'s length and CRC, rebuildRefs, resend, checkEnd to compareEnd
  // (not the timing and flow-control counters around them, nor multifdRefs(): these tests send no MREFS frame)
  "stream-in": {
    mutate: ["296-305", "418-420", "422-425", "428-428", "445-448", "459-487", "499-537"].map((r) => `src/stream/in.ts:${r}`),
    // fastest tests first, each stage stopping the chain: a mutant killed early costs only its first stages;
    // a mutant that hangs a session fails at its test's own timeout, and the run exits with sockets still open
    command: ["^(stream-in's|a small)", "^runs of", "^(stream checked|stream fault: the NAS)"].map((p) => node(["stream-faults"], p, " --test-force-exit")).join(" && "),
  },
  handshake: { mutate: ["src/link/security.ts:94-140", "src/link/listen.ts:69-132"], command: node(["security"]) },
};

const which = process.env.MUTATE ?? "replay-window";
const t = targets[which];
if (!t) throw new Error(`stryker.config.mjs: MUTATE=${which} is not a target (${Object.keys(targets).join(", ")})`);

export default {
  testRunner: "command",
  commandRunner: { command: t.command },
  buildCommand: "npx tsc -p tsconfig.json",
  mutate: t.mutate,
  coverageAnalysis: "off",
  concurrency: 1,
  // a mutant that hangs a migration is a kill by timeout: do not wait long for it
  timeoutMS: 5000,
  ignorePatterns: ["dist", ".cache", ".stryker-tmp", "web/dist", "reports", "*.log"],
  // the mutated tree is built by tsc; assembly/ (AssemblyScript) is not TypeScript Stryker can parse
  disableTypeChecks: "{src,test,bench}/**/*.ts",
  reporters: ["clear-text", "progress", "json"],
  jsonReporter: { fileName: `reports/mutation/${which}.json` },
  tempDirName: `.stryker-tmp/${which}`,
  cleanTempDir: true,
};
