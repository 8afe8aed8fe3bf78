// Starts a real Switchyard gateway (the binary the test command built) for the SDK tests.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.SWITCHYARD_BIN || path.join(root, "target/debug/switchyard");

/** Starts `switchyard` with `args` on free loopback ports (unless `args` names
 * `--listen`/`--admin`); resolves once it serves. */
export async function start(args = ["--demo"], env = {}) {
  const ports = [];
  if (!args.includes("--listen") && !args[0]?.match(/^(router|demo)$/)) ports.push("--listen", "127.0.0.1:0");
  if (!args.includes("--admin")) ports.push("--admin", "127.0.0.1:0");
  const child = spawn(BIN, [...args, ...ports], {
    env: { ...process.env, SWITCHYARD_LOG_FORMAT: "json", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = createInterface({ input: child.stderr });
  const log = [];
  const started = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start: ${log.slice(-5).join("\n")}`)), 30_000);
    lines.on("line", (l) => {
      log.push(l);
      let v;
      try {
        v = JSON.parse(l);
      } catch {
        return;
      }
      if (v.fields?.message === "switchyard started") {
        clearTimeout(timer);
        resolve(v.fields);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited with ${code}: ${log.slice(-5).join("\n")}`));
    });
  });
  const f = await started;
  return {
    child,
    log,
    ws: (p = "/ws") => `ws://${f.client}${p}`,
    http: (p) => `http://${f.client}${p}`,
    admin: (p) => `http://${f.admin}${p}`,
    /** SIGTERM (or `sig`), resolved when it exited. */
    async stop(sig = "SIGTERM") {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(sig);
      await once(child, "exit");
    },
  };
}

/** POST JSON to the admin API. */
export async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  if (r.status >= 300) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json().catch(() => ({}));
}

/** Resolves with the first event `name` of `client` for which `pred` holds. */
export function next(client, name, pred = () => true, ms = 20_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${name} event within ${ms} ms`));
    }, ms);
    const off = client.on(name, (ev) => {
      if (pred(ev)) {
        clearTimeout(timer);
        off();
        resolve(ev);
      }
    });
  });
}
