// The demo dashboard in real Chromium (Debian's, driven by playwright-core; no browser
// download): ticks and increasing offsets; a gateway restart is reconnected by the page
// itself and reported as recovered:false (the memory bus lost its history); on a NATS cluster
// the edge the page is on is killed with SIGKILL and the page carries on through the other
// edge with no gap. A screenshot is written to target/browser/dashboard.png.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, mkdir, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import net from "node:net";
import { chromium } from "playwright-core";
import { start } from "../test/gateway.mjs";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--no-first-run"];
const out = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../target/browser");

async function browser() {
  const dir = await mkdtemp(path.join(tmpdir(), "sy-chromium-"));
  const ctx = await chromium.launchPersistentContext(dir, { executablePath, headless: true, args: FLAGS });
  after(() => ctx.close());
  return ctx;
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

const text = (page, id) => page.locator(`[data-testid="${id}"]`).textContent();
const num = async (page, id) => Number(await text(page, id));

/** Waits (bounded) until the page's test ids satisfy `want`: {id: value} equal as text, or
 * {id: [">", n]} / {id: [">=", n]} as numbers. Polled in the page. */
async function until(page, want, ms = 30_000) {
  await page.waitForFunction(
    (want) =>
      Object.entries(want).every(([id, w]) => {
        const t = document.querySelector(`[data-testid="${id}"]`)?.textContent ?? "";
        if (!Array.isArray(w)) return t === w;
        const n = Number(t);
        return w[0] === ">" ? n > w[1] : n >= w[1];
      }),
    want,
    { timeout: ms, polling: 100 },
  );
}

test("the dashboard shows ticks and increasing offsets, and survives a gateway restart", async () => {
  const port = await freePort();
  const listen = ["--listen", `127.0.0.1:${port}`];
  let gw = await start(["--demo", ...listen]);
  const ctx = await browser();
  const page = await ctx.newPage();
  await page.goto(`http://127.0.0.1:${port}/`);
  await until(page, { state: "connected", ticks: [">=", 3] });
  const o1 = await num(page, "last-offset");
  await until(page, { "last-offset": [">", o1] });
  assert.equal(await num(page, "gaps"), 0);
  // A few seconds of chart for the screenshot (the README shows it).
  await until(page, { ticks: [">=", 16] });
  await mkdir(out, { recursive: true });
  await page.screenshot({ path: path.join(out, "dashboard.png"), fullPage: true });

  // Restart: the page sees the drain's 1012, reconnects by itself, and the new process's
  // memory bus has a new epoch: recovered:false.
  await gw.stop();
  gw = await start(["--demo", ...listen]);
  after(() => gw.stop());
  await until(page, { recovered: "false", state: "connected" });
  const t = await num(page, "ticks");
  await until(page, { ticks: [">", t] });
  assert.ok((await num(page, "reconnects")) >= 1);
});

const ROUTES = `
[[route]]
path = "/ws/echo"
topic = "echo"
mode = "raw"

[[route]]
path = "/ws"
topic = "app"
mode = "framed"
allow_publish = true

[[channel]]
pattern = "demo.*"
history_size = 100
history_ttl = "10m"
`;

test("on a NATS cluster, the page's edge is killed with SIGKILL and the page carries on through the other, with no gap", { skip: !process.env.NATS_URL && "NATS_URL is not set (scripts/test starts nats-server)" }, async () => {
  const bus = ["--bus", process.env.NATS_URL, "--prefix", `b${Date.now()}`];
  const dir = await mkdtemp(path.join(tmpdir(), "sy-routes-"));
  const routes = path.join(dir, "routes.toml");
  await writeFile(routes, ROUTES);
  // The page, the ticker and the router come from a standalone --demo; the page's sockets go
  // to two plain edges.
  const server = await start(["--demo", ...bus, "--routes", routes]);
  after(() => server.stop());
  const a = await start(["edge", ...bus, "--routes", routes]);
  const b = await start(["edge", ...bus, "--routes", routes]);
  after(() => Promise.all([a.stop(), b.stop()]));
  const ctx = await browser();
  const page = await ctx.newPage();
  await page.goto(server.http(`/?edges=${a.ws("/ws")},${b.ws("/ws")}`));
  await until(page, { state: "connected", ticks: [">=", 4] });
  assert.match(await text(page, "log"), new RegExp(`connected to ${a.ws("/ws")}`), "on the first edge");
  await a.stop("SIGKILL");
  const before = await num(page, "ticks");
  await until(page, { state: "connected", recovered: "true", ticks: [">=", before + 6] });
  assert.match(await text(page, "log"), new RegExp(`connected to ${b.ws("/ws")}`), "now on the other edge");
  assert.equal(await num(page, "gaps"), 0, "no offset missed");
  const offsets = await page.evaluate(() => window.switchyardOffsets.slice());
  for (let i = 1; i < offsets.length; i++) {
    assert.equal(offsets[i], offsets[i - 1] + 1, `contiguous offsets: ${offsets.slice(Math.max(0, i - 3), i + 2)}`);
  }
});
