// The live view: an HTTP server on loopback (or a 0600 unix socket) that
// serves the built visualizer page and, as Server-Sent Events, the trace
// records of the migrations it was given (running and finished). On TCP
// every path starts with a random token, so only who was shown the URL
// reads it; a unix socket is protected by its mode instead. It is a
// TraceSink: hand it to `streamOut({ trace })`, an AgentTracer, or any
// service that runs migrations.

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { chmodSync, existsSync, readFileSync, statSync, unlinkSync } from "node:fs";
import { extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes, timingSafeEqual } from "node:crypto";
import type { TraceRecord } from "./format.js";
import type { TraceSink } from "./sink.js";
import { UsageError } from "../errors.js";

/** The visualizer as `npm run build:web` builds it, beside this package's dist/. */
export const DEFAULT_WEB_ROOT = fileURLToPath(new URL("../../../web/dist/", import.meta.url));

export interface LiveTraceOptions {
  /** TCP port on 127.0.0.1 (0: any free one). */
  port?: number;
  /** Serve on this unix socket (mode 0600, no token) instead of TCP. */
  socketPath?: string;
  /** Directory of the built page (default: web/dist of this package). */
  webRoot?: string;
  /** Finished migrations kept for pages that connect later (default 20). */
  keepFinished?: number;
}

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm",
  ".json": "application/json", ".png": "image/png", ".svg": "image/svg+xml",
};
const KEEPALIVE_MS = 15_000;

export class LiveTraceServer implements TraceSink {
  /** The page's address (TCP), or the socket path's prefix "/" (unix). */
  readonly url: string;
  private readonly clients = new Set<ServerResponse>();
  /** Records of each migration, to replay to a page that connects later. */
  private readonly log = new Map<string, TraceRecord[]>();
  private readonly finished: string[] = [];
  private readonly keepalive: NodeJS.Timeout;

  private constructor(private readonly server: Server, private readonly prefix: string, private readonly webRoot: string,
    private readonly keepFinished: number, url: string, private readonly socketPath?: string) {
    this.url = url;
    this.keepalive = setInterval(() => { for (const c of this.clients) c.write(": keepalive\n\n"); }, KEEPALIVE_MS);
    this.keepalive.unref();
    server.on("request", (req, res) => this.handle(req, res));
  }

  static async start(o: LiveTraceOptions = {}): Promise<LiveTraceServer> {
    const server = createServer();
    const webRoot = normalize(o.webRoot ?? DEFAULT_WEB_ROOT);
    const keep = o.keepFinished ?? 20;
    if (o.socketPath) {
      if (existsSync(o.socketPath)) throw new UsageError(`${o.socketPath} exists: remove it or choose another socket path`);
      await listen(server, (cb) => server.listen(o.socketPath, cb));
      chmodSync(o.socketPath, 0o600);
      return new LiveTraceServer(server, "/", webRoot, keep, `unix:${o.socketPath}`, o.socketPath);
    }
    const token = randomBytes(16).toString("hex");
    await listen(server, (cb) => server.listen(o.port ?? 0, "127.0.0.1", cb));
    const port = (server.address() as AddressInfo).port;
    return new LiveTraceServer(server, `/${token}/`, webRoot, keep, `http://127.0.0.1:${port}/${token}/?live`);
  }

  write(rec: TraceRecord): void {
    const id = rec.id;
    let list = this.log.get(id);
    if (!list) this.log.set(id, (list = []));
    list.push(rec);
    if (rec.type === "end") this.retire(id);
    const msg = `data: ${JSON.stringify(rec)}\n\n`;
    for (const c of this.clients) c.write(msg);
  }

  /** Drops the oldest finished migrations beyond keepFinished. */
  private retire(id: string): void {
    this.finished.push(id);
    while (this.finished.length > this.keepFinished) this.log.delete(this.finished.shift()!);
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    res.setHeader("cache-control", "no-store");
    res.setHeader("x-content-type-options", "nosniff");
    res.setHeader("referrer-policy", "no-referrer");
    const path = new URL(req.url ?? "/", "http://x").pathname;
    if (req.method !== "GET" || !this.allowed(req, path)) {
      res.writeHead(404).end("not found");
      return;
    }
    const rest = path.slice(this.prefix.length);
    if (rest === "events") return this.events(req, res);
    const file = normalize(join(this.webRoot, rest === "" ? "index.html" : decodeURIComponent(rest)));
    if (!file.startsWith(this.webRoot.endsWith(sep) ? this.webRoot : this.webRoot + sep) || !existsSync(file) || !statSync(file).isFile()) {
      const missing = rest === "" ? `the visualizer is not built here (${this.webRoot}): run npm run build:web; the events are at ${this.prefix}events` : "not found";
      res.writeHead(404, { "content-type": "text/plain; charset=utf-8" }).end(missing);
      return;
    }
    res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" }).end(readFileSync(file));
  }

  /** The token (TCP) is the path's first segment; the Host must be loopback (no DNS rebinding). */
  private allowed(req: IncomingMessage, path: string): boolean {
    if (this.socketPath) return true;
    const host = (req.headers.host ?? "").replace(/:\d+$/, "");
    if (host !== "127.0.0.1" && host !== "localhost") return false;
    const want = Buffer.from(this.prefix);
    const got = Buffer.from(path.slice(0, want.length));
    return got.length === want.length && timingSafeEqual(got, want);
  }

  private events(req: IncomingMessage, res: ServerResponse): void {
    res.writeHead(200, { "content-type": "text/event-stream", connection: "keep-alive" });
    for (const list of this.log.values()) for (const r of list) res.write(`data: ${JSON.stringify(r)}\n\n`);
    this.clients.add(res);
    req.on("close", () => this.clients.delete(res));
  }

  /** Pages connected now. */
  get clientCount(): number {
    return this.clients.size;
  }

  async close(): Promise<void> {
    clearInterval(this.keepalive);
    for (const c of this.clients) c.end();
    this.clients.clear();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
    if (this.socketPath) try { unlinkSync(this.socketPath); } catch { /* gone */ }
  }
}

function listen(server: Server, go: (cb: () => void) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    go(() => { server.off("error", reject); resolve(); });
  });
}
