// The link's rate as the destination's Credit frames show it: bytes it
// received, not bytes this agent handed to its socket (the kernel's buffers
// at both ends take megabytes at once, so a short transfer timed on those
// reads several times faster than the link). A credit is a sample only when
// what it covers was already sent at the previous one, so the link had a
// backlog, busy all along (link/credit.ts, the same rule stream mode paces by).

import { FrameType, decodeCredit } from "./protocol.js";
import { LinkMeter } from "../link/rate.js";
import { CreditWindow } from "../link/credit.js";
import { ProtocolError } from "../wire/envelope.js";
import type { FrameLink } from "../link/channel.js";

export class AckedLink {
  /** The link's rate, from the credits (what CompressionPolicy weighs). */
  readonly meter = new LinkMeter();
  // only its sampling is used here: no limit paces agent mode
  private readonly window = new CreditWindow({ min: 0, max: 0, unmeasured: 0 }, 0);

  /** `onAck`: called with each new running total the destination acknowledged. */
  constructor(private readonly link: FrameLink, private readonly onAck: (total: number) => void = () => {}) {
    link.onFrame(FrameType.Credit, (f) => this.credit(decodeCredit(f)));
  }

  /** Bytes of this agent's frames the destination has received, as it last said. */
  get acked(): number {
    return this.window.credited;
  }

  private credit(total: number): void {
    const sent = this.link.bytesWritten;
    if (!(total >= this.window.credited && total <= sent)) {
      throw new ProtocolError(`the destination acknowledged ${total} bytes, outside ${this.window.credited}..${sent} (what it had acknowledged, what was sent)`);
    }
    this.window.sent = sent;
    const s = this.window.credit(total, "bytes");
    if (s && typeof s !== "string") this.meter.record(s.bytes, s.ms);
    this.onAck(total);
  }
}
