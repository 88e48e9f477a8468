// A source VM stand-in for agent-mode tests: records what migrateSource did to it.
import type { VmControl } from "../../src/agent/source.js";

export interface VmStub extends VmControl { running: boolean; pauses: number; resumes: number }

/** `onPause` runs when the source pauses the VM for the final round. */
export function vmStub(onPause: () => void = () => {}): VmStub {
  const v: VmStub = {
    running: true, pauses: 0, resumes: 0,
    pause: async () => { v.running = false; v.pauses++; onPause(); },
    resume: async () => { v.running = true; v.resumes++; },
  };
  return v;
}
