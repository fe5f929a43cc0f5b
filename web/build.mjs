// The web app's build: web/src -> web/dist (index.html, app.js, app.css, favicon.svg), the four
// files devstack/web.py serves. `--unit-tests` bundles src/*.test.ts for node's test runner instead.
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";

const unitTests = process.argv.includes("--unit-tests");

if (unitTests) {
  rmSync("dist-test", { recursive: true, force: true });
  await esbuild.build({
    entryPoints: readdirSync("src").filter((f) => f.endsWith(".test.ts")).map((f) => `src/${f}`),
    outdir: "dist-test",
    outExtension: { ".js": ".mjs" },
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node20",
    external: ["node:*"],
    logLevel: "warning",
  });
} else {
  mkdirSync("dist", { recursive: true });
  await esbuild.build({
    entryPoints: { app: "src/main.tsx" },
    outdir: "dist",
    bundle: true,
    minify: true,
    sourcemap: false,
    format: "esm",
    target: "es2022",
    jsx: "automatic",
    jsxImportSource: "preact",
    // The page's Content-Security-Policy allows no eval and no inline code: esbuild emits neither.
    legalComments: "none",
    logLevel: "warning",
  });
  await esbuild.build({
    entryPoints: { app: "src/app.css" },
    outdir: "dist",
    bundle: true,
    minify: true,
    logLevel: "warning",
  });
  copyFileSync("src/index.html", "dist/index.html");
  copyFileSync("src/favicon.svg", "dist/favicon.svg");
}
