import { openNasIndex } from "../../adapters/nas/index-file.js";
import { parse, helpText, str, num, progress, type CommandSpec } from "../args.js";

export const spec: CommandSpec = {
  name: "index",
  summary: "hash every 4 KiB block of a NAS disk image into its block index",
  usage: "pagetwin index --image IMAGE [--index FILE] [--rebuild] [--json]",
  options: {
    image: { type: "string", help: "raw disk image on the NAS mount" },
    index: { type: "string", help: "index file (default: IMAGE.pagetwin-index, beside the image)" },
    rebuild: { type: "boolean", help: "hash again even if the index is current" },
    workers: { type: "string", default: "0", help: "hash on this many worker threads (0: this thread)" },
    json: { type: "boolean", help: "print one JSON object" },
  },
  details: "The index is reused while the image's size, mtime and inode are unchanged. It holds the random\nhash seed, so it is created mode 0600; both hosts read it from the NAS.",
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const nas = await openNasIndex(str(values, "image"), {
    indexPath: values.index as string | undefined, rebuild: !!values.rebuild, onProgress: progress("indexing"),
    workers: num(values, "workers", 0, 256),
  });
  const out = {
    image: nas.image.path, index: nas.indexPath, blocks: nas.header.blocks, distinct: nas.index.size,
    built: nas.built, ms: Math.round(nas.ms), bytesPerBlock: +(nas.index.bytes / Math.max(nas.header.blocks, 1)).toFixed(1),
    rateMBps: nas.built ? +((nas.header.blocks * 4096) / 1e6 / (nas.ms / 1000)).toFixed(0) : null,
  };
  nas.image.close();
  if (values.json) console.log(JSON.stringify(out));
  else console.log(`${out.built ? "built" : "loaded"} ${out.index}: ${out.blocks} blocks, ${out.distinct} distinct non-zero, ${out.ms} ms${out.rateMBps ? ` (${out.rateMBps} MB/s)` : ""}, ${out.bytesPerBlock} B of memory per block`);
  return 0;
}
