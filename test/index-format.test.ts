// --format on the commands that name an image: auto (the default) tells qcow2
// by its magic, raw reads the file's own bytes, and an index read in another
// format than asked for now is rebuilt. A destination reads the image in the
// format its index records.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { cliPath, jsonResult } from "./helpers/cli.js";
import { qemuImg, skipNoQemuImg } from "./helpers/qemu-img.js";
import { openDisk } from "../src/adapters/nas/disk.js";
import { readIndexHeader } from "../src/adapters/nas/index-file.js";
import { recordedFormat } from "../src/adapters/nas/index-header.js";

const pt = (args: string[]) => spawnSync(process.execPath, [cliPath, ...args], { encoding: "utf8" });

test("--format: a bad value is a usage error on every command that names an image", () => {
  for (const args of [["index", "--image", "x"], ["analyze", "--ram", "x", "--image", "y"], ["stream-out", "--to", "127.0.0.1:1", "--image", "y", "--insecure"]]) {
    const r = pt([...args, "--format", "vmdk", "--json"]);
    assert.equal(r.status, 2, `${args[0]}: ${r.stderr}`);
    assert.match(r.stderr, /--format is raw, qcow2 or auto \(got "vmdk"\)/);
  }
});

test("index --format raw reads a qcow2 file's own bytes; auto reads the guest's disk and rebuilds the index read the other way", { skip: skipNoQemuImg }, (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pt-format-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const raw = join(dir, "guest.raw"), image = join(dir, "disk.qcow2");
  writeFileSync(raw, randomBytes(1 << 20));
  qemuImg("convert", "-f", "raw", "-O", "qcow2", raw, image);
  const asRaw = pt(["index", "--image", image, "--format", "raw", "--json"]);
  assert.equal(asRaw.status, 0, asRaw.stderr);
  const r = jsonResult(asRaw.stdout);
  assert.equal(r.built, true);
  assert.equal(r.blocks, Math.floor(statSync(image).size / 4096), "the file's bytes, as raw");
  assert.equal(readIndexHeader(`${image}.pagetwin-index`).format, "raw");
  const auto = jsonResult(pt(["index", "--image", image, "--json"]).stdout);
  assert.equal(auto.built, true, "an index read as raw is rebuilt when the image is read as qcow2");
  assert.equal(auto.blocks, 256, "the guest's 1 MiB disk");
  const h = readIndexHeader(`${image}.pagetwin-index`);
  assert.equal(h.format, "qcow2");
  // what a destination opens: the format the index records
  const disk = openDisk(image, { format: recordedFormat(h) });
  assert.equal(disk.format, "qcow2");
  disk.close();
  assert.equal(jsonResult(pt(["index", "--image", image, "--format", "qcow2", "--json"]).stdout).built, false, "the same format: loaded");
});
