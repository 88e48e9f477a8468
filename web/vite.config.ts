// Vite config of the visualizer: `vite web` serves it, `vite build web` builds
// it into web/dist. The worker imports the TypeScript core from ../src (its
// browser entry, with the wasm inlined: run `npm run build` first).
import { defineConfig } from "vite";
import { fileURLToPath } from "node:url";

const repo = fileURLToPath(new URL("..", import.meta.url));

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "./",
  worker: { format: "es" },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    chunkSizeWarningLimit: 1000,
  },
  server: { fs: { allow: [repo] } },
  preview: { host: "127.0.0.1" },
});
