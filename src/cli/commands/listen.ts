import { DestinationAgent } from "../../agent/destination.js";
import { printJson } from "../json.js";
import { parse, helpText, str, int, parseSize, securityOptions, security, UsageError, type CommandSpec } from "../args.js";

export const spec: CommandSpec = {
  name: "listen",
  summary: "destination agent: receive a VM's RAM, fetching twin pages from the NAS",
  usage: "pagetwin listen --ram FILE [--create-ram [--max-ram SIZE]] [--image IMAGE] [--host ADDR] [--port N] (--psk-file KEY | --tls-cert C --tls-key K --tls-ca CA | --insecure) [--once] [--json]",
  options: {
    ram: { type: "string", help: "destination RAM file (the destination QEMU's memory-backend-file)" },
    "create-ram": { type: "boolean", help: "create the RAM file with the source's size (it must not be in use)" },
    "max-ram": { type: "string", default: "64GiB", help: "with --create-ram: the largest RAM a source may create here (e.g. 16GiB); without it the existing RAM file's size is the bound" },
    image: { type: "string", help: "the VM's raw disk image on the NAS (needed for twin pages)" },
    index: { type: "string", help: "index file (default: beside the image); only its seed and id are read" },
    host: { type: "string", default: "127.0.0.1", help: "address to listen on" },
    port: { type: "string", default: "7790", help: "TCP port (0: any free port)" },
    ...securityOptions("source agent", true),
    "device-incoming": { type: "string", help: "where this host's QEMU takes the device state that `pagetwin migrate` sends through the link (its migrate-incoming URI, tcp:127.0.0.1:PORT or unix:PATH; default: a free loopback port, told to the source)" },
    verify: { type: "string", default: "held", help: "RAM check at switchover: held (hashes of what was written) or reread (read the RAM file again)" },
    once: { type: "boolean", help: "exit after one migration by an authenticated source (exit code 0 if it completed); peers refused in the TLS handshake do not count" },
    json: { type: "boolean", help: "NDJSON on stdout: a listening event, then a result per migration (docs/JSON.md)" },
  },
};

export async function run(argv: string[]): Promise<number> {
  const { values, help } = parse(spec, argv);
  if (help) { console.log(helpText(spec)); return 0; }
  const agent = new DestinationAgent({
    ramPath: str(values, "ram"), createRam: !!values["create-ram"], imagePath: values.image as string | undefined,
    indexPath: values.index as string | undefined, host: values.host as string, port: int(values, "port", 0, 65535),
    maxRamBytes: parseSize(values["max-ram"] as string, "--max-ram"),
    ...(values["device-incoming"] ? { deviceIncoming: values["device-incoming"] as string } : {}),
    log: (m) => { if (!values.json) console.error(m); },
    ...security(values),
    verify: values.verify === "reread" ? "reread" : values.verify === "held" ? "held" : (() => { throw new UsageError("--verify is held or reread"); })(),
  });
  const port = await agent.listen();
  if (values.json) printJson("listen", "listening", { host: values.host, port });
  else console.error(`pagetwin listen: waiting for a migration on ${values.host}:${port}`);
  for (;;) {
    const r = await agent.nextResult();
    if (values.json) printJson("listen", "result", { ok: r.status === "completed", ...r, ...(r.status === "completed" ? {} : { errorCode: "PAGETWIN_MIGRATION" }) });
    // a failure's reason was logged as it happened: the summary does not repeat it
    else console.error(`pagetwin listen: migration ${r.status}${r.error ? " (see above)" : ""}: ${r.pagesWritten} pages written, ${r.twinsVerified} twins verified from the NAS, ${r.twinsRejected} refetched`);
    if (values.once) {
      agent.close();
      return r.status === "completed" ? 0 : 1;
    }
  }
}
