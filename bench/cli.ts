// What every bench file needs to run on its own: its arguments (with --help
// and a check for options it does not have), its numeric flags, and whether
// it is the program being run (rather than imported by bench/index).

import { pathToFileURL } from "node:url";

export function argValue(args: string[], name: string): number | undefined {
  const i = args.indexOf(name);
  if (i < 0) return undefined;
  const v = Number(args[i + 1]);
  if (!Number.isFinite(v)) throw new RangeError(`bench: ${name} needs a number`);
  return v;
}

export function isMain(moduleUrl: string): boolean {
  return !!process.argv[1] && moduleUrl === pathToFileURL(process.argv[1]).href;
}

export function argString(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  if (i < 0) return undefined;
  const v = args[i + 1];
  if (!v || v.startsWith("--")) throw new RangeError(`bench: ${name} needs a value`);
  return v;
}

/**
 * The program's arguments, after what every bench does first: `--help` (or -h) prints `usage` and exits 0, and
 * an option not in `known` exits 2 naming it (a typo would otherwise run the whole bench on its defaults).
 */
export function benchArgs(usage: string, known: readonly string[]): string[] {
  const args = process.argv.slice(2);
  if (args.includes("--help") || args.includes("-h")) {
    console.log(usage);
    process.exit(0);
  }
  const unknown = args.filter((a) => a.startsWith("--") && !known.includes(a));
  if (unknown.length) {
    process.stderr.write(`bench: unknown option ${unknown.join(", ")} (options: ${known.join(" ")}, --help)\n`);
    process.exit(2);
  }
  return args;
}
