import type { NasIndex } from "../../adapters/nas/index-file.js";
import { formatStatus, indexStatus } from "../../adapters/nas/index-status.js";
import { refreshByReread, type RefreshResult } from "../../adapters/nas/refresh.js";
import { openTrackedIndex } from "../../adapters/qemu/tracked-index.js";
import type { NbdAddress } from "../../adapters/nbd/client.js";
import { parseEndpoint } from "../../link/endpoint.js";
import type { Progress } from "../../log.js";
import { QmpClient } from "../../adapters/qemu/qmp.js";
import { parse, helpText, str, int, parseRate, diskFormat, FORMAT_OPTION, type CommandSpec } from "../args.js";
import { ProgressReporter } from "../progress.js";
import { printJson } from "../json.js";
import { openImageIndex } from "../image-index.js";

export const spec: CommandSpec = {
  name: "index",
  summary: "hash every 4 KiB block of a NAS disk image into its block index",
  usage: "pagetwin index --image IMAGE [--index FILE] [--format raw|qcow2] [--status | --rebuild | --qmp SOCKET [--drive NAME] [--nbd ADDR] | --rate RATE] [--json]",
  options: {
    image: { type: "string", help: "disk image on the NAS mount (raw or qcow2)" },
    index: { type: "string", help: "index file (default: IMAGE.pagetwin-index, beside the image)" },
    ...FORMAT_OPTION,
    status: { type: "boolean", help: "only say how fresh the index is (nothing is read or written)" },
    rebuild: { type: "boolean", help: "hash again with a new seed and id even if the index is usable" },
    qmp: { type: "string", help: "QMP socket of the VM running on the image: track its writes with a dirty bitmap, and refresh from it" },
    drive: { type: "string", help: "with --qmp: the VM's drive (e.g. virtio0; default: its only drive)" },
    nbd: { type: "string", help: "with --qmp, when that QEMU already runs an NBD server: its address (unix:PATH or HOST:PORT); pagetwin adds a read-only export to it and removes it after" },
    rate: { type: "string", default: "0", help: "a refresh without a dirty bitmap re-reads the whole image at most this fast (e.g. 100MB; 0: no limit)" },
    workers: { type: "string", default: "0", help: "hash on this many worker threads (0: this thread; starting workers costs ~0.1 s each, so they pay only on images of several GiB)" },
    json: { type: "boolean", help: "NDJSON on stdout: progress events, then one result (docs/JSON.md)" },
  },
  details: `The index is current while the image's size, mtime and inode are unchanged. When the image was
written since, the index is still used (stale entries cost resends, never wrong pages), and this
command refreshes it: with --qmp, only the blocks QEMU's dirty bitmap says were written are read
(over QEMU's NBD server); without, the whole image is re-read (at --rate). Each refresh is a new
generation of the same index (same seed and id). It holds the random hash seed, so it is created
mode 0600; both hosts read it from the NAS. See docs/INDEX.md.`,
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const image = str(values, "image");
  const json = !!values.json;
  diskFormat(values); // a bad --format is a usage error, --status or not
  if (values.status) {
    const s = indexStatus(image, values.index as string | undefined);
    if (json) printJson("index", "result", { ok: true, ...s });
    else console.log(formatStatus(s));
    return 0;
  }
  const workers = int(values, "workers", 0, 256);
  const rate = parseRate(values.rate as string, "--rate");
  const progress = new ProgressReporter("index", { json });
  const open = () => openImageIndex(image, progress, { indexPath: values.index as string | undefined, rebuild: !!values.rebuild, workers, format: diskFormat(values) });
  const onRefreshProgress = (p: Progress) => progress.update("re-reading", p.done, p.total, "blocks");
  let nas: NasIndex;
  let refreshed: RefreshResult | null = null;
  if (values.qmp) {
    const qmp = await QmpClient.connect(values.qmp as string);
    try {
      const drive = values.drive as string | undefined;
      const nbd = values.nbd as string | undefined;
      ({ nas, refreshed } = await openTrackedIndex(qmp, open, {
        ...(drive ? { drive } : {}), ...(nbd ? { nbdServer: nbdAddress(nbd) } : {}), rateBytesPerSec: rate, onRefreshProgress,
      }));
    } finally {
      qmp.close();
    }
  } else {
    nas = await open();
    try {
      if (nas.stale) refreshed = await refreshByReread(nas, { rateBytesPerSec: rate, onProgress: onRefreshProgress });
    } catch (err) {
      nas.image.close();
      throw err;
    }
  }
  nas.image.close();
  const out = {
    ok: true, image: nas.image.path, index: nas.indexPath, format: nas.image.format, blocks: nas.header.blocks, distinct: nas.index.size,
    built: nas.built, totalTimeMs: nas.ms, memoryBytesPerBlock: nas.index.bytes / Math.max(nas.header.blocks, 1),
    ...(nas.built ? { hashMBs: (nas.header.blocks * 4096) / 1e6 / (nas.ms / 1000) } : {}),
    generation: nas.header.generation, stale: nas.stale,
    ...(refreshed ? { refresh: { kind: refreshed.kind, blocksRead: refreshed.blocksRead, blocksChanged: refreshed.blocksChanged, totalTimeMs: refreshed.ms } } : {}),
  };
  if (json) printJson("index", "result", out);
  else {
    console.log(`${out.built ? "built" : "loaded"} ${out.index}: ${out.blocks} blocks, ${out.distinct} distinct non-zero, ${out.totalTimeMs.toFixed(0)} ms${out.hashMBs ? ` (${out.hashMBs.toFixed(0)} MB/s)` : ""}, ${out.memoryBytesPerBlock.toFixed(1)} B of memory per block`);
    if (out.refresh) console.log(`refreshed by ${out.refresh.kind}: ${out.refresh.blocksRead} blocks read, ${out.refresh.blocksChanged} changed, ${out.refresh.totalTimeMs.toFixed(0)} ms; generation ${out.generation}`);
  }
  return 0;
}

/** --nbd: a unix:PATH or HOST:PORT. */
function nbdAddress(s: string): NbdAddress {
  const e = parseEndpoint(s, "--nbd");
  return e.kind === "unix" ? { path: e.path } : { host: e.host, port: e.port };
}
