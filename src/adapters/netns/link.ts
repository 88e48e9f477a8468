// A real constrained link between two hosts, on one machine: two network
// namespaces joined by a veth pair, each end shaped with a token bucket
// (tc tbf) to the given rate. Needs root (ip netns). destroy() deletes
// everything; so does process exit, if the caller forgot.

import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from "node:child_process";
import { randomBytes } from "node:crypto";

export interface NetnsLinkOptions {
  /** Rate of each direction, e.g. "1gbit" (default). */
  rate?: string;
  /** tbf burst (default "256kb") and latency (default "50ms"). */
  burst?: string;
  latency?: string;
  /** Third octet of 10.77.X.0/24 (default: random 1..254). */
  subnet?: number;
  /** Suffix of the names (default: random hex). */
  tag?: string;
}

export interface NetnsLink {
  srcNs: string;
  dstNs: string;
  srcVeth: string;
  dstVeth: string;
  srcIp: string;
  dstIp: string;
  rate: string;
  /** Runs a command in a namespace and waits; throws with its stderr on failure. */
  exec(ns: string, cmd: string, args: string[]): string;
  /** Starts a long-running command in a namespace. */
  spawn(ns: string, cmd: string, args: string[], opts?: SpawnOptions): ChildProcess;
  /** Bytes sent by the veth end in `ns` (tx counter). */
  txBytes(ns: string): number;
  destroy(): void;
}

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 20_000 });
  if (r.error) throw new Error(`${cmd} ${args.join(" ")}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (exit ${r.status}): ${(r.stderr || r.stdout).trim()}`);
  return r.stdout;
}

/** True if this process may create network namespaces (root, iproute2 present). */
export function netnsAvailable(): boolean {
  if (typeof process.getuid === "function" && process.getuid() !== 0) return false;
  const r = spawnSync("ip", ["netns", "list"], { stdio: "ignore", timeout: 5000 });
  const t = spawnSync("tc", ["-V"], { stdio: "ignore", timeout: 5000 });
  return r.status === 0 && t.status === 0;
}

const live = new Set<NetnsLink>();
let hooked = false;

export function createNetnsLink(opts: NetnsLinkOptions = {}): NetnsLink {
  const tag = opts.tag ?? randomBytes(2).toString("hex");
  const subnet = opts.subnet ?? 1 + (randomBytes(1)[0]! % 254);
  const rate = opts.rate ?? "1gbit";
  const srcNs = `pt-src-${tag}`, dstNs = `pt-dst-${tag}`;
  const srcVeth = `pts${tag}`, dstVeth = `ptd${tag}`;
  const srcIp = `10.77.${subnet}.1`, dstIp = `10.77.${subnet}.2`;
  let destroyed = false;
  const link: NetnsLink = {
    srcNs, dstNs, srcVeth, dstVeth, srcIp, dstIp, rate,
    exec: (ns, cmd, args) => run("ip", ["netns", "exec", ns, cmd, ...args]),
    spawn: (ns, cmd, args, o = {}) => spawn("ip", ["netns", "exec", ns, cmd, ...args], o),
    txBytes: (ns) => {
      const dev = ns === srcNs ? srcVeth : dstVeth;
      return Number(run("ip", ["netns", "exec", ns, "cat", `/sys/class/net/${dev}/statistics/tx_bytes`]).trim());
    },
    destroy: () => {
      if (destroyed) return;
      destroyed = true;
      live.delete(link);
      // Deleting a namespace deletes the veth end in it (and its peer).
      for (const ns of [srcNs, dstNs]) spawnSync("ip", ["netns", "delete", ns], { stdio: "ignore", timeout: 10_000 });
      // If setup failed before the veth pair moved into the namespaces.
      spawnSync("ip", ["link", "delete", srcVeth], { stdio: "ignore", timeout: 10_000 });
    },
  };
  if (!hooked) {
    hooked = true;
    process.on("exit", () => { for (const l of live) l.destroy(); });
  }
  live.add(link);
  try {
    run("ip", ["netns", "add", srcNs]);
    run("ip", ["netns", "add", dstNs]);
    run("ip", ["link", "add", srcVeth, "type", "veth", "peer", "name", dstVeth]);
    run("ip", ["link", "set", srcVeth, "netns", srcNs]);
    run("ip", ["link", "set", dstVeth, "netns", dstNs]);
    for (const [ns, dev, ip] of [[srcNs, srcVeth, srcIp], [dstNs, dstVeth, dstIp]] as const) {
      link.exec(ns, "ip", ["addr", "add", `${ip}/24`, "dev", dev]);
      link.exec(ns, "ip", ["link", "set", dev, "up"]);
      link.exec(ns, "ip", ["link", "set", "lo", "up"]);
      link.exec(ns, "tc", ["qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", opts.burst ?? "256kb", "latency", opts.latency ?? "50ms"]);
    }
  } catch (err) {
    link.destroy();
    throw err;
  }
  return link;
}
