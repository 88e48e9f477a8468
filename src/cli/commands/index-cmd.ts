import { parse, helpText, str, int, type CommandSpec } from "../args.js";
import { Progress } from "../progress.js";
import { printJson } from "../json.js";
import { openImageIndex } from "../image-index.js";

export const spec: CommandSpec = {
  name: "index",
  summary: "hash every 4 KiB block of a NAS disk image into its block index",
  usage: "pagetwin index --image IMAGE [--index FILE] [--rebuild] [--json]",
  options: {
    image: { type: "string", help: "raw disk image on the NAS mount" },
    index: { type: "string", help: "index file (default: IMAGE.pagetwin-index, beside the image)" },
    rebuild: { type: "boolean", help: "hash again even if the index is current" },
    workers: { type: "string", default: "0", help: "hash on this many worker threads (0: this thread; starting workers costs ~0.1 s each, so they pay only on images of several GiB)" },
    json: { type: "boolean", help: "NDJSON on stdout: progress events, then one result (docs/JSON.md)" },
  },
  details: "The index is reused while the image's size, mtime and inode are unchanged. It holds the random\nhash seed, so it is created mode 0600; both hosts read it from the NAS.",
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const image = str(values, "image");
  const workers = int(values, "workers", 0, 256);
  const json = !!values.json;
  const nas = await openImageIndex(image, new Progress("index", { json }), { indexPath: values.index as string | undefined, rebuild: !!values.rebuild, workers });
  nas.image.close();
  const out = {
    ok: true, image: nas.image.path, index: nas.indexPath, blocks: nas.header.blocks, distinct: nas.index.size,
    built: nas.built, totalTimeMs: nas.ms, memoryBytesPerBlock: nas.index.bytes / Math.max(nas.header.blocks, 1),
    ...(nas.built ? { hashMBs: (nas.header.blocks * 4096) / 1e6 / (nas.ms / 1000) } : {}),
  };
  if (json) printJson("index", "result", out);
  else console.log(`${out.built ? "built" : "loaded"} ${out.index}: ${out.blocks} blocks, ${out.distinct} distinct non-zero, ${out.totalTimeMs.toFixed(0)} ms${out.hashMBs ? ` (${out.hashMBs.toFixed(0)} MB/s)` : ""}, ${out.memoryBytesPerBlock.toFixed(1)} B of memory per block`);
  return 0;
}
