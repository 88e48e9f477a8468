// Entry of a pool worker thread in Node.
import { parentPort, workerData } from "node:worker_threads";
import { expose, nodeEndpoint } from "./comlink.js";
import { PoolWorkerApi } from "./worker-api.js";

const { seed, flavor } = workerData as { seed: bigint; flavor?: "simd" | "scalar" };
const api = await PoolWorkerApi.create(seed, flavor);
expose(api, nodeEndpoint(parentPort));
parentPort!.postMessage({ pagetwinPoolReady: true });
