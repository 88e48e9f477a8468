// Two stand-in QEMUs for agent mode without a guest: QMP on a unix socket
// answering what `pagetwin migrate` asks, a source that migrates a few bytes of
// "device state" into the URI it is given, and a destination that takes them
// on its migrate-incoming address. Enough to run the CLI end to end.
// (Not a test file: `npm run test:ts` runs dist/test/*.test.js only.)

import net from "node:net";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

type Cmd = { execute: string; id?: unknown; arguments?: Record<string, unknown> };

export interface FakeQemu {
  qmp: string;
  /** The VM's run state, as query-status says it. */
  status: string;
  commands: string[];
  close(): Promise<void>;
}

const GREETING = JSON.stringify({ QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: "fake" }, capabilities: [] } });
export const DEVICE_STATE = Buffer.alloc(4096, 0x5a);

export async function fakeQemu(role: "source" | "destination"): Promise<FakeQemu> {
  const dir = mkdtempSync(join(tmpdir(), "pt-fakeqemu-"));
  const sockets = new Set<net.Socket>();
  const servers: net.Server[] = [];
  let migration = "none";
  const vm: FakeQemu = {
    qmp: join(dir, "qmp.sock"), status: role === "source" ? "running" : "inmigrate", commands: [],
    async close() {
      for (const s of sockets) s.destroy();
      await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
      rmSync(dir, { recursive: true, force: true });
    },
  };
  const answer = (cmd: Cmd): unknown => {
    switch (cmd.execute) {
      case "query-status": return { status: vm.status, running: vm.status === "running" };
      case "query-migrate-capabilities": return [{ capability: "x-ignore-shared", state: false }];
      case "query-migrate": return { status: migration, "total-time": 3, downtime: 1, ram: { transferred: migration === "completed" ? DEVICE_STATE.length : 0 } };
      case "stop": vm.status = "paused"; return {};
      case "cont": vm.status = "running"; return {};
      case "migrate": sendDeviceState(String(cmd.arguments?.["uri"])); return {};
      case "migrate-incoming": takeDeviceState(String(cmd.arguments?.["uri"])); return {};
      default: return {};
    }
  };
  const sendDeviceState = (uri: string) => {
    migration = "active";
    const path = uri.replace(/^unix:/, "");
    const s = net.connect(path, () => s.end(DEVICE_STATE));
    s.on("error", () => { migration = "failed"; });
    s.on("close", () => { if (migration === "active") { migration = "completed"; vm.status = "postmigrate"; } });
  };
  const takeDeviceState = (uri: string) => {
    const m = /^tcp:([^:]+):(\d+)$/.exec(uri);
    if (!m) return;
    const srv = net.createServer({ allowHalfOpen: true }, (c) => {
      sockets.add(c);
      c.resume();
      c.on("end", () => { vm.status = "paused"; c.end(); });
    });
    servers.push(srv);
    srv.listen(Number(m[2]), m[1]);
  };
  const qmp = net.createServer((sock) => {
    sockets.add(sock);
    sock.on("error", () => {});
    sock.setEncoding("utf8");
    sock.write(GREETING + "\r\n");
    let buf = "";
    sock.on("data", (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Cmd;
        buf = buf.slice(nl + 1);
        vm.commands.push(cmd.execute);
        sock.write(JSON.stringify({ return: answer(cmd), id: cmd.id }) + "\r\n");
        if (cmd.execute === "quit") { vm.status = "shutdown"; sock.end(); }
      }
    });
  });
  servers.push(qmp);
  await new Promise<void>((resolve, reject) => { qmp.once("error", reject); qmp.listen(vm.qmp, resolve); });
  return vm;
}
