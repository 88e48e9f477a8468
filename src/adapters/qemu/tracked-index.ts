// An image's index kept with QEMU's write tracking from the start: the dirty
// bitmap is added before the index is opened or built, so a write that lands
// while a build reads the image is in it (a bitmap added after the build would
// miss a write to a block the build had already read).

import type { NasIndex } from "../nas/index-file.js";
import { sameIdentity } from "../nas/index-header.js";
import { refreshByReread, type RefreshResult } from "../nas/refresh.js";
import type { Progress } from "../../log.js";
import { DirtyTracker, type DirtyTrackerOptions } from "./dirty-tracker.js";
import type { QmpClient } from "./qmp.js";

export interface TrackedIndexOptions extends DirtyTrackerOptions {
  /** A refresh without the bitmap's history (a bitmap just added to a loaded index) re-reads the image at most this fast (0: no limit). */
  rateBytesPerSec?: number;
  onRefreshProgress?: (p: Progress) => void;
  /** Called after a build, before its writes are handed to the index's bitmap (tests land a write there). */
  afterBuild?: () => Promise<void>;
}

export interface TrackedIndex {
  nas: NasIndex;
  tracker: DirtyTracker;
  /** The refresh this call made (null: the index was current). */
  refreshed: RefreshResult | null;
}

/**
 * Opens (or builds) the index with `open` while QEMU tracks the drive's
 * writes, and brings it up to date: after a build, from the writes that
 * landed during it; for a loaded stale index, from the bitmap (re-reading the
 * image once when the bitmap is new and knows nothing of earlier writes).
 */
export async function openTrackedIndex(qmp: QmpClient, open: () => Promise<NasIndex>, o: TrackedIndexOptions = {}): Promise<TrackedIndex> {
  const pending = await DirtyTracker.begin(qmp, o);
  let nas: NasIndex;
  try {
    nas = await open();
  } catch (err) {
    await pending.drop();
    throw err;
  }
  try {
    if (nas.built) {
      await o.afterBuild?.();
      const tracker = await pending.adopt(nas.header.indexId);
      // the header holds the image as the build began: a write since is in the bitmap
      const written = !sameIdentity(nas.header.identity, nas.image.identity());
      return { nas, tracker, refreshed: written ? await tracker.refresh(nas) : null };
    }
    await pending.drop();
    const tracker = await DirtyTracker.attach(qmp, nas.header.indexId, o);
    if (!nas.stale) return { nas, tracker, refreshed: null };
    const refreshed = tracker.created
      ? await refreshByReread(nas, { ...(o.rateBytesPerSec ? { rateBytesPerSec: o.rateBytesPerSec } : {}), ...(o.onRefreshProgress ? { onProgress: o.onRefreshProgress } : {}) })
      : await tracker.refresh(nas);
    return { nas, tracker, refreshed };
  } catch (err) {
    await pending.drop();
    nas.image.close();
    throw err;
  }
}
