// Builds the SDK into a temporary folder and compares it with the committed dist/ (the
// gateway embeds dist/switchyard.min.js, so a stale build would ship old code). Prints the
// minified + gzipped size. Exit 1 when dist/ is stale.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { gzipSync } from "node:zlib";

const here = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const out = mkdtempSync(path.join(tmpdir(), "sy-dist-"));
const bin = (name) => path.join(here, "node_modules/.bin", name);
execFileSync(bin("tsc"), ["-p", here, "--outDir", out], { stdio: "inherit" });
execFileSync(bin("esbuild"), [path.join(here, "src/index.ts"), "--bundle", "--format=esm", "--minify", `--outfile=${path.join(out, "switchyard.min.js")}`, "--log-level=warning"], { stdio: "inherit" });
let stale = [];
for (const f of readdirSync(out)) {
  const fresh = readFileSync(path.join(out, f));
  let committed;
  try {
    committed = readFileSync(path.join(here, "dist", f));
  } catch {
    committed = Buffer.alloc(0);
  }
  if (!fresh.equals(committed)) stale.push(f);
}
const min = readFileSync(path.join(out, "switchyard.min.js"));
console.log(`switchyard.min.js: ${min.length} bytes minified, ${gzipSync(min, { level: 9 }).length} bytes gzipped`);
if (stale.length) {
  console.error(`dist/ is stale (${stale.join(", ")}): run \`npm run build\` in clients/js and commit dist/`);
  process.exit(1);
}
