import { openNasIndex, type NasIndex } from "../../adapters/nas/index-file.js";
import { formatStatus, indexStatus } from "../../adapters/nas/index-status.js";
import { refreshByReread, type RefreshResult } from "../../adapters/nas/refresh.js";
import { DirtyTracker } from "../../adapters/qemu/dirty-tracker.js";
import { QmpClient } from "../../adapters/qemu/qmp.js";
import { parse, helpText, str, num, progress, parseRate, type CommandSpec } from "../args.js";

export const spec: CommandSpec = {
  name: "index",
  summary: "hash every 4 KiB block of a NAS disk image into its block index",
  usage: "pagetwin index --image IMAGE [--index FILE] [--status | --rebuild | --qmp SOCKET [--drive NAME] | --rate RATE] [--json]",
  options: {
    image: { type: "string", help: "raw disk image on the NAS mount" },
    index: { type: "string", help: "index file (default: IMAGE.pagetwin-index, beside the image)" },
    status: { type: "boolean", help: "only say how fresh the index is (nothing is read or written)" },
    rebuild: { type: "boolean", help: "hash again with a new seed and id even if the index is usable" },
    qmp: { type: "string", help: "QMP socket of the VM running on the image: track its writes with a dirty bitmap, and refresh from it" },
    drive: { type: "string", help: "with --qmp: the VM's drive (e.g. virtio0; default: its only drive)" },
    rate: { type: "string", default: "0", help: "a refresh without a dirty bitmap re-reads the whole image at most this fast (e.g. 100MB; 0: no limit)" },
    workers: { type: "string", default: "0", help: "hash on this many worker threads (0: this thread)" },
    json: { type: "boolean", help: "print one JSON object" },
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
  if (values.status) {
    const s = indexStatus(image, values.index as string | undefined);
    console.log(values.json ? JSON.stringify(s) : formatStatus(s));
    return 0;
  }
  const nas = await openNasIndex(image, {
    indexPath: values.index as string | undefined, rebuild: !!values.rebuild, onProgress: progress("indexing"),
    workers: num(values, "workers", 0, 256),
  });
  let refreshed: (RefreshResult & { nbdBytes?: number }) | null = null;
  try {
    refreshed = await keepFresh(nas, values);
  } finally {
    nas.image.close();
  }
  const out = {
    image: nas.image.path, index: nas.indexPath, blocks: nas.header.blocks, distinct: nas.index.size,
    built: nas.built, ms: Math.round(nas.ms), bytesPerBlock: +(nas.index.bytes / Math.max(nas.header.blocks, 1)).toFixed(1),
    rateMBps: nas.built ? +((nas.header.blocks * 4096) / 1e6 / (nas.ms / 1000)).toFixed(0) : null,
    generation: nas.header.generation, stale: nas.stale,
    refresh: refreshed ? { kind: refreshed.kind, blocksRead: refreshed.blocksRead, blocksChanged: refreshed.blocksChanged, ms: Math.round(refreshed.ms) } : null,
  };
  if (values.json) console.log(JSON.stringify(out));
  else {
    console.log(`${out.built ? "built" : "loaded"} ${out.index}: ${out.blocks} blocks, ${out.distinct} distinct non-zero, ${out.ms} ms${out.rateMBps ? ` (${out.rateMBps} MB/s)` : ""}, ${out.bytesPerBlock} B of memory per block`);
    if (out.refresh) console.log(`refreshed by ${out.refresh.kind}: ${out.refresh.blocksRead} blocks read, ${out.refresh.blocksChanged} changed, ${out.refresh.ms} ms; generation ${out.generation}`);
  }
  return 0;
}

/**
 * With --qmp: start (or go on) tracking the VM's writes, and refresh a stale
 * index from the bitmap (a bitmap just started knows nothing yet: the image
 * is re-read once). Without: re-read a stale index at --rate.
 */
async function keepFresh(nas: NasIndex, values: Record<string, string | boolean | undefined>): Promise<RefreshResult | null> {
  const rate = parseRate(values.rate as string);
  if (!values.qmp) return nas.stale ? refreshByReread(nas, { rateBytesPerSec: rate, onProgress: progress("re-reading") }) : null;
  const qmp = await QmpClient.connect(values.qmp as string);
  try {
    const drive = values.drive as string | undefined;
    const tracker = await DirtyTracker.attach(qmp, nas.header.indexId, drive ? { drive } : {});
    if (!nas.stale && !nas.built) return null;
    if (tracker.created) return nas.built ? null : refreshByReread(nas, { rateBytesPerSec: rate, onProgress: progress("re-reading") });
    return await tracker.refresh(nas);
  } finally {
    qmp.close();
  }
}
