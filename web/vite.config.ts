// Vite config of the visualizer: `vite web` serves it, `vite build web` builds
// it into web/dist. The worker imports the TypeScript core from ../src and
// the wasm from ../build (run `npm run build` first).
import { defineConfig } from "vite";
import { fileURLToPath } from "node:url";

const repo = fileURLToPath(new URL("..", import.meta.url));

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "./",
  worker: { format: "es" },
  resolve: { alias: { "node:fs/promises": fileURLToPath(new URL("./src/no-node-fs.ts", import.meta.url)) } },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    assetsInlineLimit: 0, // keep the wasm as files, fetched by URL
    chunkSizeWarningLimit: 1000,
  },
  server: { fs: { allow: [repo] } },
  preview: { host: "127.0.0.1" },
});
