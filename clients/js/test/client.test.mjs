// SDK tests against a real gateway (memory bus, demo backends), with Node's WebSocket from `ws`.
import { test, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client, SwitchyardError } from "../dist/index.js";
import { start, post, next } from "./gateway.mjs";

const gw = await start();
after(() => gw.stop());

// Every client a test makes is closed after it, passed or failed: a failed test must not leave
// a client reconnecting forever (it would hold the test process open).
const made = [];
afterEach(() => {
  for (const c of made.splice(0)) c.close();
});

/** A client of the test gateway, closed after the test. */
function client(extra = {}) {
  return track(new Client({ urls: gw.ws("/ws"), WebSocket, backoff: { base: 50, cap: 200 }, ...extra }));
}

function track(c) {
  made.push(c);
  return c;
}

/** Drops the client's socket without a close handshake (the server sees the TCP end). */
function dropSocket(c) {
  // The `ws` object behind the client (test-only access to a private field).
  c.ws._socket.destroy();
}

test("backoff: full jitter between 0 and min(cap, base * 2^attempt)", () => {
  const b = { base: 100, cap: 5000 };
  for (let a = 0; a < 20; a++) {
    const hi = Math.min(5000, 100 * 2 ** a);
    assert.equal(Client.backoffDelay(a, b, () => 0), 0);
    assert.equal(Client.backoffDelay(a, b, () => 0.999999), Math.floor(0.999999 * hi));
    for (let i = 0; i < 50; i++) {
      const d = Client.backoffDelay(a, b);
      assert.ok(d >= 0 && d < hi, `attempt ${a}: ${d} not in [0, ${hi})`);
    }
  }
});

test("send is acknowledged and answered; a dropped socket resumes the session with every delivery once", async () => {
  const c = client();
  const got = [];
  c.on("message", (m) => m.kind === "delivery" && got.push(m));
  c.connect();
  const first = await next(c, "connected");
  assert.equal(first.resumed, false);
  const one = next(c, "message", (m) => m.kind === "delivery" && m.n === 1);
  const ack = await c.send({ n: 1 });
  assert.deepEqual(ack, { duplicate: false });
  await one;
  const resumed = next(c, "resumed");
  dropSocket(c);
  const r = await resumed;
  assert.equal(r.resumed, true, JSON.stringify(r));
  assert.equal(c.sessionId, first.session, "the same session after the resume");
  const two = next(c, "message", (m) => m.kind === "delivery" && m.n === 2);
  await c.send({ n: 2 });
  await two;
  assert.deepEqual(got.map((m) => [m.n, m.data]), [[1, { echo: { n: 1 } }], [2, { echo: { n: 2 } }]]);
  c.close();
});

test("channel recovery: messages published while away arrive after the reconnect, contiguous, recovered:true", async () => {
  const channel = `demo.t${Date.now()}`;
  const c = client();
  const offsets = [];
  c.on("message", (m) => m.kind === "channel" && m.channel === channel && offsets.push([m.offset, m.data.i]));
  c.connect();
  await c.subscribe(channel);
  // Listening before publishing: the delivery can beat the HTTP answer.
  const third = next(c, "message", (m) => m.channel === channel && m.data.i === 2);
  for (let i = 0; i < 3; i++) await post(gw.admin("/api/publish"), { channel, data: { i } });
  await third;
  // The client stays away until these are published: its reconnect waits for `away`.
  let back;
  const away = new Promise((r) => (back = r));
  const rec = next(c, "recovered", (r) => r.channel === channel);
  const last = next(c, "message", (m) => m.channel === channel && m.data.i === 7);
  c.o.getToken = async () => {
    await away;
    return undefined;
  };
  dropSocket(c);
  for (let i = 3; i < 8; i++) await post(gw.admin("/api/publish"), { channel, data: { i } });
  back();
  assert.equal((await rec).recovered, true);
  await last;
  assert.deepEqual(offsets.map((o) => o[1]), [0, 1, 2, 3, 4, 5, 6, 7], "each once, in order");
  for (let k = 1; k < offsets.length; k++) assert.equal(offsets[k][0], offsets[k - 1][0] + 1, "contiguous offsets");
  c.close();
});

test("rewind:1 gives the last value first", async () => {
  const channel = `demo.r${Date.now()}`;
  for (let i = 0; i < 3; i++) await post(gw.admin("/api/publish"), { channel, data: { i } });
  const c = client();
  c.connect();
  const m = next(c, "message", (m) => m.channel === channel);
  await c.subscribe(channel, { rewind: 1 });
  assert.deepEqual((await m).data, { i: 2 });
  c.close();
});

test("unacknowledged sends are resent after a resume with their ids; the backend sees each once", async () => {
  const c = client();
  const echoes = [];
  c.on("message", (m) => m.kind === "delivery" && echoes.push(m.data.echo.k));
  c.connect();
  await next(c, "connected");
  // Queued while connected, then the socket drops before any ack can arrive.
  const sends = [c.send({ k: "a" }), c.send({ k: "b" }), c.send({ k: "c" })];
  dropSocket(c);
  const acks = await Promise.all(sends);
  assert.equal(acks.length, 3);
  const end = next(c, "message", (m) => m.kind === "delivery" && m.data.echo.k === "end");
  await c.send({ k: "end" });
  await end;
  for (const k of ["a", "b", "c"]) {
    assert.equal(echoes.filter((e) => e === k).length, 1, `${k} reached the backend once: ${echoes}`);
  }
  c.close();
});

test("the offline queue is bounded, with a clear error", async () => {
  const c = track(new Client({ urls: "ws://127.0.0.1:1/ws", WebSocket, offlineQueue: 2, backoff: { base: 10000 } }));
  c.connect();
  const a = c.send(1);
  const b = c.send(2);
  await assert.rejects(c.send(3), (e) => e instanceof SwitchyardError && e.code === "offline_queue_full");
  c.close();
  await assert.rejects(a, (e) => e.code === "closed");
  await assert.rejects(b, (e) => e.code === "closed");
});

test("a dead connection (no answer at all) is detected by silence and retried", async () => {
  // A TCP server that accepts and never answers the upgrade.
  const net = await import("node:net");
  const sockets = [];
  const srv = net.createServer((s) => sockets.push(s)).listen(0, "127.0.0.1");
  await new Promise((r) => srv.once("listening", r));
  const c = track(new Client({
    urls: `ws://127.0.0.1:${srv.address().port}/ws`,
    WebSocket,
    silenceTimeout: 300,
    pingInterval: 100,
    backoff: { base: 50, cap: 100, maxAttempts: 3 },
  }));
  const seen = [];
  c.on("disconnected", (d) => seen.push(d));
  c.connect();
  await next(c, "state", (s) => s.state === "closed", 10_000);
  assert.equal(seen.length, 4, "three retries, then it gives up");
  assert.ok(seen.every((d) => d.code === 1006));
  for (const s of sockets) s.destroy();
  srv.close();
});

/** A hostile server: `ws` on a free port, doing `onConnection` to each socket. Returns the
 * URL, a counter of connections and a stop function. */
async function hostile(onConnection) {
  const { WebSocketServer } = await import("ws");
  const { createServer } = await import("node:http");
  // Our own HTTP server, so that stop can end every TCP connection, including one still in its
  // upgrade (`WebSocketServer.close` waits for those and would hold the test open).
  const http = createServer();
  const wss = new WebSocketServer({ server: http, handleProtocols: (p) => [...p][0] });
  await new Promise((r) => http.listen(0, "127.0.0.1", r));
  const seen = { n: 0 };
  wss.on("connection", (sock) => {
    seen.n += 1;
    onConnection(sock, seen.n);
  });
  const stop = async () => {
    for (const sock of wss.clients) sock.terminate();
    http.closeAllConnections();
    await new Promise((r) => wss.close(() => http.close(r)));
  };
  return { url: `ws://127.0.0.1:${http.address().port}/ws`, seen, stop };
}

test("a server that closes every socket after 100 ms gets a bounded, growing backoff, not a tight loop", async () => {
  const srv = await hostile((sock, n) => {
    sock.send(JSON.stringify({ op: "welcome", session: `S${n}` }));
    setTimeout(() => sock.close(1011, "boom"), 100);
  });
  const c = track(new Client({ urls: srv.url, WebSocket, backoff: { base: 100, cap: 1000 } }));
  const started = Date.now();
  c.connect();
  // Bounded by the clock of the test (4 s): count what happened.
  await new Promise((r) => setTimeout(r, 4000));
  c.close();
  const secs = (Date.now() - started) / 1000;
  const perMinute = (srv.seen.n / secs) * 60;
  console.log(`# closes-after-100ms server: ${srv.seen.n} connections in ${secs.toFixed(1)} s (${perMinute.toFixed(0)}/min)`);
  // 100 ms of life + a growing jittered delay: far fewer than the 40 a 0 ms retry would make.
  assert.ok(srv.seen.n >= 3 && srv.seen.n <= 20, `${srv.seen.n} connections`);
  await srv.stop();
});

test("a 4001 mid-session calls getToken and reconnects at once, and a server that keeps sending 4001 is backed off", async () => {
  let tokens = 0;
  const srv = await hostile((sock, n) => {
    sock.send(JSON.stringify({ op: "welcome", session: `S${n}` }));
    setTimeout(() => sock.close(4001, "token expired"), 100);
  });
  const c = track(new Client({
    urls: srv.url,
    WebSocket,
    backoff: { base: 200, cap: 1000 },
    getToken: () => `t${++tokens}`,
  }));
  const closes = [];
  c.on("disconnected", (d) => closes.push(d));
  c.connect();
  await new Promise((r) => setTimeout(r, 3000));
  c.close();
  console.log(`# always-4001 server: ${srv.seen.n} connections, ${tokens} tokens in 3 s`);
  assert.equal(tokens, srv.seen.n, "a fresh token before every connect");
  assert.ok(closes.every((d) => d.code === 4001 && d.willRetry));
  assert.ok(srv.seen.n >= 2 && srv.seen.n <= 15, `${srv.seen.n} connections`);
  await srv.stop();
});
