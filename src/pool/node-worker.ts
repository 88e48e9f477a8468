// Entry of a pool worker thread in Node (the file EnginePool's `workerUrl` points at).
import { parentPort, workerData } from "node:worker_threads";
import { expose, nodeEndpoint } from "./comlink.js";
import { PoolWorkerApi, type WorkerConfig } from "./worker-api.js";

const api = await PoolWorkerApi.create(workerData as WorkerConfig);
expose(api, nodeEndpoint(parentPort));
parentPort!.postMessage({ pagetwinPoolReady: true });
