// What every bench file needs to run on its own: its numeric flags, and
// whether it is the program being run (rather than imported by bench/index).

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
