// The device state (CPU registers, device models) through the agents' own
// TLS link: after the destination's verdict on RAM, the source QEMU migrates
// its device state into a local socket of the source agent's, which carries
// it as Device frames; the destination agent writes them into its QEMU's
// incoming socket. Nothing of the VM crosses the network outside TLS.

import type { Socket } from "node:net";
import { jsonFrame, frame, parseJson, printable, ProtocolError } from "../wire/envelope.js";
import type { FrameLink } from "../link/channel.js";
import { dial } from "../link/dial.js";
import { parseEndpoint } from "../link/endpoint.js";
import { drained } from "../link/rate.js";
import { TIMEOUTS } from "../link/timeouts.js";
import { FrameType } from "./protocol.js";

/** The source's end: what the orchestrator hands the source QEMU's device-state connection to. */
export class DeviceTunnel {
  /** Bytes of device state carried. */
  bytes = 0;

  /** `incoming`: the QEMU URI the destination QEMU must listen on (migrate-incoming), as the destination agent said. */
  constructor(private readonly link: FrameLink, readonly incoming: string) {}

  /** Carries one device-state connection; resolves when the destination QEMU has all of it. */
  async carry(qemu: Socket): Promise<void> {
    qemu.pause();
    for await (const chunk of qemu as AsyncIterable<Buffer>) {
      this.bytes += chunk.length;
      await this.link.send(frame(FrameType.Device, chunk));
    }
    await this.link.send(jsonFrame(FrameType.DeviceEnd, {}));
    const done = parseJson<{ ok?: unknown; error?: unknown }>(await this.link.next(FrameType.DeviceDone, TIMEOUTS.answerMs), "DeviceDone");
    if (done.ok !== true) throw new ProtocolError(`the destination agent could not hand the device state to its QEMU: ${printable(String(done.error ?? "no reason given"))}`);
  }
}

/** The destination's end: Device frames into the destination QEMU's incoming socket. */
export class DeviceSink {
  private qemu: Socket | null = null;
  bytes = 0;

  /** `incoming`: where the destination QEMU listens (tcp:HOST:PORT or unix:PATH). */
  constructor(readonly incoming: string) {}

  /** Takes the frames after Done until DeviceEnd; answers DeviceDone either way. */
  async run(link: FrameLink): Promise<void> {
    try {
      for (;;) {
        const f = await link.next(undefined, TIMEOUTS.answerMs);
        if (f.type === FrameType.DeviceEnd) break;
        if (f.type !== FrameType.Device) throw new ProtocolError(`expected a Device frame after Done, got ${FrameType[f.type] ?? f.type}`);
        await this.write(f.payload);
      }
      await this.finish();
      await link.send(jsonFrame(FrameType.DeviceDone, { ok: true }));
    } catch (err) {
      this.qemu?.destroy();
      await link.send(jsonFrame(FrameType.DeviceDone, { ok: false, error: (err as Error).message })).catch(() => undefined);
      throw err;
    }
  }

  private async write(bytes: Buffer): Promise<void> {
    if (!this.qemu) {
      const at = parseEndpoint(this.incoming.replace(/^tcp:/, ""), "the destination QEMU's incoming address");
      this.qemu = await dial(at, { kind: "insecure" }, { peer: "destination QEMU (device state)", allowHalfOpen: true });
      this.qemu.resume();
    }
    this.bytes += bytes.length;
    if (!this.qemu.write(bytes)) await drained(this.qemu);
    if (this.qemu.destroyed) throw new Error("the destination QEMU closed its device-state connection early (see its log)");
  }

  /** Ends the stream and waits for QEMU to close its side: it has read everything. */
  private async finish(): Promise<void> {
    const q = this.qemu;
    if (!q) throw new ProtocolError("the source sent no device state");
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`the destination QEMU did not finish reading the device state within ${TIMEOUTS.answerMs} ms`)), TIMEOUTS.answerMs);
      q.once("close", () => { clearTimeout(t); resolve(); });
      q.end();
    });
  }
}
