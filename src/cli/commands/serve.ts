// `pagetwin serve`: the per-host service (docs/SERVE.md). Runs until SIGTERM
// or SIGINT; the first lets running migrations finish (--drain-timeout),
// a second fails those still running (their source VMs keep running).

import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { helpText, int, num, parse, securityOptions, security, type CommandSpec } from "../args.js";
import { printJson } from "../json.js";
import { withUiDefault } from "../trace.js";
import { KEEP_OPEN_MS, ServeService } from "../../serve/service.js";
import type { ServeEvent } from "../../serve/migration.js";
import { DEFAULT_CONTROL } from "../../serve/client.js";
import { DEFAULT_QEMU_SOCKETS, QemuSockets } from "../../serve/qemu-sockets.js";

export { DEFAULT_CONTROL };

export const serveSpec: CommandSpec = {
  name: "serve",
  summary: "one service per host for every stream-mode migration on it, both directions",
  usage: "pagetwin serve [--control PATH] [--peer-listen HOST:PORT] [--qemu-sockets DIR] [--qemu-group G] [--workers N] [--queue-ms MS] [--trace-dir DIR] [--ui [PORT]] (--psk-file KEY | --tls-cert C --tls-key K --tls-ca CA | --insecure) [--json]",
  options: {
    control: { type: "string", default: DEFAULT_CONTROL, help: "the control socket local tools use (created mode 0600; its directory 0700 when created)" },
    "peer-listen": { type: "string", help: "HOST:PORT where other hosts' services connect (one port for all migrations); without it this service only sends" },
    "drain-timeout": { type: "string", default: "600", help: "on SIGTERM, seconds running migrations get to finish before they are failed (their source VMs keep running)" },
    "keep-open": { type: "string", default: String(KEEP_OPEN_MS / 1000), help: "seconds an image's index stays open after its last migration (the next migration of it starts without loading it); 0: closed at once" },
    "qemu-sockets": { type: "string", default: DEFAULT_QEMU_SOCKETS, help: "the directory of QEMU's migration sockets (one per migration, the same path on every host: libvirt's unix:// migrate URI); made mode 0770 with QEMU's group (--qemu-group), 0700 without one" },
    "qemu-group": { type: "string", help: "the group QEMU runs as (qemu.conf's `group`), which may use the socket directory; default: libvirt-qemu or qemu, whichever this host has (none when the service is not root)" },
    workers: { type: "string", default: "0", help: "worker threads per migration for its sessions' per-byte work (outgoing: parse, look up, compress; incoming: NAS reads, verification, decompression), so a multifd migration's channels use several cores; 0: the service's own thread. A traced outgoing migration encodes on the service's thread (stream-out's rule)" },
    "queue-ms": { type: "string", help: "outgoing migrations: link time (ms) that may be on its way beyond what the destination has handed its QEMU before the source QEMU's socket waits (stream-out's --queue-ms; docs/STREAM.md)" },
    "trace-dir": { type: "string", help: "write each migration's trace here: the source's view as MIGRATION.out.ndjson, the destination's as MIGRATION.in.ndjson (docs/TRACE.md)" },
    ui: { type: "string", help: "serve the visualizer with every migration of this service live on 127.0.0.1:PORT (--ui alone: a free port); the URL, with its random token, goes to stderr and hello's `ui`" },
    ...securityOptions("other hosts' pagetwin serve", true),
    json: { type: "boolean", help: "NDJSON on stdout: a listening line, then every migration's events (state, progress, end)" },
    quiet: { type: "boolean", help: "no log lines on stderr" },
  },
  details: `Control socket: one JSON request per line ({"id", "op", ...}), answered by id.
Ops: hello, outgoing (prepare a migration from this host; answers migrateUri and,
for libvirt, libvirtMigrateUri and listenAddress), list, status, cancel, watch,
unwatch. docs/SERVE.md has every field, the error codes, and a recipe with
virsh migrate. The peer link between services is TLS (the same --psk-file on
every host, or certificates from one CA); --insecure only on a network nobody
else reaches.`,
};

export async function run(argv: string[]): Promise<number> {
  const p = parse(serveSpec, withUiDefault(argv));
  if (p.help) {
    process.stdout.write(helpText(serveSpec) + "\n");
    return 0;
  }
  const v = p.values;
  const json = Boolean(v["json"]);
  const control = v["control"] as string;
  const drainMs = num(v, "drain-timeout", 0) * 1000;
  const keepOpenMs = num(v, "keep-open", 0) * 1000;
  const queueMs = v["queue-ms"] === undefined ? undefined : num(v, "queue-ms", 1);
  const workers = int(v, "workers", 0, 64);
  const log = v["quiet"] ? () => {} : (m: string) => process.stderr.write(`[pagetwin serve] ${m}\n`);
  ensureDir(dirname(control));
  const svc = await ServeService.start({
    control, log, keepOpenMs, qemuSockets: QemuSockets.resolve(v["qemu-sockets"] as string, v["qemu-group"] as string | undefined), workers, ...(queueMs !== undefined ? { queueMs } : {}), ...security(v), ...(v["peer-listen"] ? { peerListen: v["peer-listen"] as string } : {}),
    ...(v["trace-dir"] ? { traceDir: v["trace-dir"] as string } : {}), ...(typeof v["ui"] === "string" ? { ui: { port: int(v, "ui", 0, 65535) } } : {}),
  });
  // the URL even with --quiet: it is the only way to the page
  if (svc.uiUrl) process.stderr.write(`[pagetwin serve] live view: ${svc.uiUrl}\n`);
  if (json) {
    printJson("serve", "listening", { control, peerPort: svc.peerPort, ui: svc.uiUrl });
    // the envelope's `event` is the line's kind; the service's event is `type`
    svc.subscribe(({ event, ...rest }: ServeEvent) => { if (event !== "trace") printJson("serve", "progress", { type: event, ...rest }); });
  }
  let signals = 0;
  const stopped = new Promise<void>((resolve) => {
    const onSig = (sig: NodeJS.Signals) => {
      signals++;
      log(signals === 1 ? `${sig}: taking no new migrations; running ones may finish (up to ${drainMs / 1000} s)` : `${sig} again: failing the migrations still running`);
      void svc.shutdown(signals === 1 ? drainMs : 0).then(resolve);
    };
    process.on("SIGTERM", onSig);
    process.on("SIGINT", onSig);
  });
  await stopped;
  log("stopped");
  return 0;
}

/** The control socket's directory: made 0700 when it is not there (/run/pagetwin under systemd's RuntimeDirectory). */
function ensureDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
}
