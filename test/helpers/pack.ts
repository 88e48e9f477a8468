// Installs the package as a user gets it: `npm pack` of this (already built)
// checkout, then `npm install <tarball>` into a fresh project in a temp dir.
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");

export interface PackedProject {
  /** The consumer project's directory (package.json with "type":"module"). */
  readonly project: string;
  /** The tarball npm pack made. */
  readonly tarball: string;
  /** Files the tarball holds, as `npm pack --json` lists them. */
  readonly files: readonly string[];
  cleanup(): void;
}

export interface PackOptions {
  /** Extra packages to install next to pagetwin (e.g. "vite"), resolved from the npm cache first. */
  readonly with?: readonly string[];
  /** Install optional dependencies too (default: omitted, as a lean install). */
  readonly optional?: boolean;
  /**
   * Run no install scripts (npm --ignore-scripts): with `optional`, the tools'
   * platform binaries (esbuild, rollup) are installed while zstd-napi is not compiled.
   */
  readonly ignoreScripts?: boolean;
}

// Under `npm test`, node_modules/.bin comes first on PATH, and a dev dependency
// (as-pect, through npm-install-peers) puts an npm 6 there: run the user's npm,
// the first one on PATH outside any node_modules.
const PATH = (process.env["PATH"] ?? "").split(path.delimiter).filter((d) => !d.includes(`${path.sep}node_modules${path.sep}`)).join(path.delimiter);

// Under `npm test` the npm running the tests exports its own settings as
// npm_config_* (and npm_*) variables, which would override the child's flags
// (e.g. bring optional dependencies back): the child gets the user's plain env.
function userEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k)));
}

/** Runs the user's npm (not node_modules/.bin's) in `cwd`. */
export function npm(args: string[], cwd: string): string {
  return execFileSync("npm", [...args, "--no-audit", "--no-fund", "--loglevel=error"], {
    cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...userEnv(), PATH, npm_config_update_notifier: "false" },
  });
}

/**
 * The visualizer's page as prepack builds it (`npm run build:web`, into web/dist): `--ui` serves it from
 * the installed package. Built here when missing (the test run builds the wasm and TypeScript only).
 */
function ensureWebBuilt(): void {
  if (existsSync(path.join(REPO, "web", "dist", "index.html"))) return;
  execFileSync(process.execPath, [path.join(REPO, "node_modules", "vite", "bin", "vite.js"), "build", "web", "--logLevel", "warn"], { cwd: REPO, stdio: ["ignore", "ignore", "pipe"] });
}

/** Pack without re-running prepack (the test run has built already) and install into a new project. */
export function packAndInstall(opts: PackOptions = {}): PackedProject {
  ensureWebBuilt();
  const dir = mkdtempSync(path.join(tmpdir(), "pagetwin-consumer-"));
  const cleanup = () => rmSync(dir, { recursive: true, force: true });
  try {
    const packed = JSON.parse(npm(["pack", "--ignore-scripts", "--json", "--pack-destination", dir], REPO)) as {
      filename: string;
      files: { path: string }[];
    }[];
    const tarball = path.join(dir, packed[0]!.filename);
    const project = path.join(dir, "project");
    execFileSync("mkdir", ["-p", project]);
    writeFileSync(path.join(project, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
    const install = ["install", "--prefer-offline", tarball, ...(opts.with ?? [])];
    if (!opts.optional) install.push("--omit=optional");
    if (opts.ignoreScripts) install.push("--ignore-scripts");
    npm(install, project);
    return { project, tarball, files: packed[0]!.files.map((f) => f.path), cleanup };
  } catch (err) {
    cleanup();
    throw err;
  }
}

/** The package as installed in `project`. */
export function installedPackage(project: string): string {
  return path.join(project, "node_modules", "pagetwin");
}

export function listInstalled(project: string): string[] {
  return readdirSync(path.join(project, "node_modules"));
}
