// When a QEMU's guest stopped and resumed, from its QMP events (STOP,
// RESUME), on this process's clock (performance.now()). The event's own
// timestamp (QEMU's wall clock, on this host: its QMP socket is local) dates
// it, not its arrival: a proxy busy with the stream at switchover reads its
// events late.

import { QmpClient, type QmpEvent } from "./qmp.js";

/** States in which a finished incoming migration leaves a guest that will not run by itself (-S). */
const LEFT_STOPPED = new Set(["paused", "prelaunch", "postmigrate", "shutdown", "internal-error", "io-error", "guest-panicked"]);

export class RunStateWatch {
  /** performance.now() time of the last STOP / RESUME event (0: none seen). */
  stopAt = 0;
  resumeAt = 0;

  private constructor(readonly qmp: QmpClient) {
    qmp.on("event", (ev) => this.onEvent(ev));
  }

  /** Connects to a QMP unix socket and watches its events. */
  static async open(path: string): Promise<RunStateWatch> {
    return new RunStateWatch(await QmpClient.connect(path));
  }

  private onEvent(ev: QmpEvent): void {
    if (ev.event !== "STOP" && ev.event !== "RESUME") return;
    const ts = ev.timestamp;
    const age = ts ? Math.max(0, Date.now() - (ts.seconds * 1000 + ts.microseconds / 1000)) : 0;
    const at = performance.now() - age;
    if (ev.event === "STOP") this.stopAt = at;
    else this.resumeAt = at;
  }

  /**
   * The first RESUME after `since` (its time), or null: none within
   * `timeoutMs`, the QMP connection closed, or the guest is left stopped
   * (started with -S: someone else resumes it).
   */
  async resumeAfter(since: number, timeoutMs: number): Promise<number | null> {
    const deadline = performance.now() + timeoutMs;
    while (this.resumeAt <= since) {
      if (performance.now() > deadline || this.qmp.closed) return null;
      const status = await this.qmp.execute<{ status: string }>("query-status", undefined, { timeoutMs: 5000 }).then((s) => s.status, () => "");
      if (this.resumeAt > since) break;
      if (LEFT_STOPPED.has(status)) return null;
      await new Promise((r) => setTimeout(r, 20));
    }
    return this.resumeAt;
  }

  close(): void {
    this.qmp.close();
  }
}
