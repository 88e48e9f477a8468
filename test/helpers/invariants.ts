// The stats invariants every agent-mode migration keeps (docs/AGENT-MODE.md,
// "What the stats mean"): each round accounts for every page of RAM once,
// and total-time covers set-up and every round.

import assert from "node:assert/strict";
import type { IterationRecord } from "../../src/agent/source.js";

type Round = Pick<IterationRecord, "iteration" | "pages" | "durationMs">;

export interface Totals {
  pages: number;
  normal: number;
  twin: number;
  duplicate: number;
  totalTimeMs: number;
  setupTimeMs: number;
}

/** `slackMs`: rounding of the totals (the CLI's JSON rounds to whole ms). */
export function assertStatsInvariants(rounds: readonly Round[], t: Totals, slackMs = 0): void {
  assert.ok(rounds.length > 0, "at least one round");
  for (const r of rounds) {
    const { normal, twin, zero, clean } = r.pages;
    assert.equal(normal + twin + zero + clean, t.pages, `round ${r.iteration}: normal ${normal} + twin ${twin} + zero ${zero} + clean ${clean} = the VM's ${t.pages} pages`);
  }
  const sum = (f: (r: Round) => number) => rounds.reduce((n, r) => n + f(r), 0);
  assert.equal(t.normal, sum((r) => r.pages.normal), "normal: the rounds' sum");
  assert.equal(t.twin, sum((r) => r.pages.twin), "twin: the rounds' sum");
  assert.equal(t.duplicate, sum((r) => r.pages.zero), "duplicate: the rounds' sum");
  assert.ok(t.setupTimeMs > 0, "set-up takes time");
  const rounds_ = sum((r) => r.durationMs);
  assert.ok(t.totalTimeMs + slackMs >= t.setupTimeMs + rounds_, `total-time ${t.totalTimeMs} ms >= setup-time ${t.setupTimeMs} + rounds ${rounds_.toFixed(1)} ms`);
}
