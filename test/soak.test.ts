import { test } from "node:test";
import assert from "node:assert/strict";
import { soak } from "../bench/soak.js";

test("soak: migrations back and forth with random faults: none corrupted, none stranded", { timeout: 240_000 }, async () => {
  const r = await soak({ migrations: 15, pages: 1024, quiet: true });
  assert.equal(r.migrations, 15);
  assert.equal(r.corrupted, 0, r.errors.join("\n"));
  assert.equal(r.stranded, 0, r.errors.join("\n"));
  assert.equal(r.completed + r.abortedCleanly, 15);
  assert.ok(r.completed > 0, "some migrations got through");
  assert.equal(r.byFault.none.aborted, 0, "a migration without a fault never fails");
});
