// Switchyard client for the framed protocol (`switchyard.v2`): failover between edges,
// reconnect with exponential backoff and full jitter, dead-connection detection, session
// resume, channel recovery, acknowledged sends with resend and server-side de-duplication,
// a bounded offline queue, and token refresh. Zero dependencies; browsers and Node.js >= 20
// (pass `WebSocket` where there is no global one, e.g. from the `ws` package).

/** The WebSocket constructor the client uses (the browser's, or e.g. `ws` in Node.js). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketCtor = new (url: string, protocols?: string[]) => WebSocketLike;

export interface Backoff {
  /** First delay cap in ms (default 250). */
  base?: number;
  /** Largest delay cap in ms (default 15000). */
  cap?: number;
  /** Attempts in a row before giving up (default: never). */
  maxAttempts?: number;
}

export interface Options {
  /** Edge URLs of a framed route (`wss://edge1/ws`), tried in turn. */
  urls: string | string[];
  /** A WebSocket constructor; default: the global one. */
  WebSocket?: WebSocketCtor;
  /** A credential, sent as the `bearer.<token>` subprotocol (never in the URL). */
  token?: string;
  /** Called before every connect (and after a 4001) for a fresh credential. */
  getToken?: () => string | Promise<string>;
  backoff?: Backoff;
  /** Ping the server this often (ms, default 10000). */
  pingInterval?: number;
  /** No message at all for this long (ms, default 25000): the connection is dead. */
  silenceTimeout?: number;
  /** Sends and publishes kept while offline (default 1000); past it they are refused. */
  offlineQueue?: number;
  /** Largest message sent (bytes of JSON, default 1 MiB); bigger is refused here. */
  maxMessageSize?: number;
  /** Randomness for the jitter (tests). */
  random?: () => number;
}

export type State = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface SubscribeOptions {
  /** The last `n` retained messages first (`n` = 1: the last value). */
  rewind?: number;
}

export interface Subscribed {
  channel: string;
  epoch?: string;
  offset?: number;
  recovered?: boolean;
}

export type Message =
  | { kind: "channel"; channel: string; offset?: number; data: unknown }
  | { kind: "delivery"; n: number; data: unknown };

export interface Events {
  connecting: { url: string; attempt: number };
  connected: { url: string; session: string; resumed: boolean };
  disconnected: { code: number; reason: string; willRetry: boolean; delay?: number };
  resumed: { session: string; resumed: boolean; reason?: string };
  subscribed: Subscribed;
  recovered: { channel: string; recovered: boolean; epoch?: string; offset?: number };
  message: Message;
  error: { code: string; message: string };
  state: { state: State };
}

/** A send, publish or subscribe the server refused, or the client could not carry out. */
export class SwitchyardError extends Error {
  constructor(
    public readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "SwitchyardError";
  }
}

interface Pending {
  id: number;
  frame: string;
  resolve: (v: { duplicate: boolean }) => void;
  reject: (e: SwitchyardError) => void;
  sent: boolean;
}

interface Chan {
  epoch?: string;
  offset?: number;
  rewind?: number;
  waiters: Array<(s: Subscribed) => void>;
}

type Listener<K extends keyof Events> = (ev: Events[K]) => void;

const OPEN = 1;
/** A connection that lasted this long (ms) resets the backoff. */
const STABLE_MS = 5000;

/** One client: one logical session over successive sockets. */
export class Client {
  private readonly o: Required<Omit<Options, "token" | "getToken" | "WebSocket">> & Options;
  private readonly urls: string[];
  private readonly WS: WebSocketCtor;
  private ws: WebSocketLike | null = null;
  private _state: State = "idle";
  private urlIndex = 0;
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private pinger: ReturnType<typeof setInterval> | undefined;
  private lastHeard = 0;
  private session: string | undefined;
  private resumeToken: string | undefined;
  private delivered = 0;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly channels = new Map<string, Chan>();
  private readonly listeners: { [K in keyof Events]?: Array<Listener<K>> } = {};
  private tokenAge = 0;
  private connectedAt = 0;
  private stopped = false;

  constructor(options: Options) {
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (!WS) throw new SwitchyardError("no_websocket", "no global WebSocket: pass options.WebSocket");
    this.WS = WS;
    this.urls = Array.isArray(options.urls) ? options.urls.slice() : [options.urls];
    if (this.urls.length === 0) throw new SwitchyardError("no_url", "options.urls is empty");
    this.o = {
      backoff: {},
      pingInterval: 10_000,
      silenceTimeout: 25_000,
      offlineQueue: 1000,
      maxMessageSize: 1 << 20,
      random: Math.random,
      ...options,
    };
  }

  /** The connection's state. */
  get state(): State {
    return this._state;
  }

  /** The session id (kept across resumes), once connected. */
  get sessionId(): string | undefined {
    return this.session;
  }

  /** Backend deliveries received in this session (the last `n`). */
  get deliveries(): number {
    return this.delivered;
  }

  on<K extends keyof Events>(event: K, fn: Listener<K>): () => void {
    const list = (this.listeners[event] ??= []) as Array<Listener<K>>;
    list.push(fn);
    return () => {
      const i = list.indexOf(fn);
      if (i >= 0) list.splice(i, 1);
    };
  }

  private emit<K extends keyof Events>(event: K, ev: Events[K]): void {
    for (const fn of (this.listeners[event] ?? []) as Array<Listener<K>>) {
      try {
        fn(ev);
      } catch {
        // A listener's exception is its own business.
      }
    }
  }

  private setState(s: State): void {
    if (this._state !== s) {
      this._state = s;
      this.emit("state", { state: s });
    }
  }

  /** Connects (and keeps reconnecting until `close`). */
  connect(): void {
    this.stopped = false;
    if (this._state === "idle" || this._state === "closed") void this.open();
  }

  /** Closes for good: no reconnect; pending sends are refused. */
  close(): void {
    this.stopped = true;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "client closed");
    this.failPending("closed", "the client was closed");
    this.setState("closed");
  }

  /** The delay before reconnect attempt `attempt` (0-based): full jitter. */
  static backoffDelay(attempt: number, b: Backoff, random: () => number = Math.random): number {
    const base = b.base ?? 250;
    const cap = b.cap ?? 15_000;
    return Math.floor(random() * Math.min(cap, base * 2 ** Math.min(attempt, 30)));
  }

  private async open(): Promise<void> {
    this.clearTimers();
    const url = this.urls[this.urlIndex % this.urls.length];
    this.setState(this.session ? "reconnecting" : "connecting");
    this.emit("connecting", { url, attempt: this.attempt });
    const protocols = ["switchyard.v2"];
    let token = this.o.token;
    if (this.o.getToken) {
      try {
        token = await this.o.getToken();
        this.tokenAge = Date.now();
      } catch (e) {
        this.emit("error", { code: "token", message: `getToken failed: ${String(e)}` });
        return this.retry(1006, "getToken failed");
      }
    }
    if (this.stopped) return;
    if (token) protocols.push(`bearer.${token}`);
    let target = url;
    if (this.session && this.resumeToken) {
      const q = `resume=${encodeURIComponent(this.resumeToken)}&delivered=${this.delivered}`;
      target += (url.includes("?") ? "&" : "?") + q;
    }
    let ws: WebSocketLike;
    try {
      ws = new this.WS(target, protocols);
    } catch (e) {
      this.emit("error", { code: "connect", message: String(e) });
      return this.retry(1006, "cannot open");
    }
    this.ws = ws;
    this.lastHeard = Date.now();
    // Dead connection: no answer at all (not even to the upgrade) within the silence timeout.
    this.pinger = setInterval(() => this.tick(), Math.min(this.o.pingInterval, this.o.silenceTimeout / 2));
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      if (typeof ev.data === "string") this.onText(ev.data, url);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {
      // Always followed by a close.
    };
  }

  private tick(): void {
    const ws = this.ws;
    if (!ws) return;
    if (Date.now() - this.lastHeard > this.o.silenceTimeout) {
      // Silent: treat as dead (a half-open TCP connection never closes by itself).
      this.ws = null;
      try {
        ws.close(4000, "silence");
      } catch {
        // Already closing.
      }
      this.onClose(1006, "no message within the silence timeout");
      return;
    }
    if (ws.readyState === OPEN) this.raw({ op: "ping" });
  }

  private raw(op: unknown): void {
    const ws = this.ws;
    if (ws && ws.readyState === OPEN) ws.send(JSON.stringify(op));
  }

  private onText(text: string, url: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(text);
    } catch {
      return;
    }
    switch (m.op) {
      case "welcome":
        return this.onWelcome(m, url);
      case "deliver": {
        const n = Number(m.n);
        if (n <= this.delivered) return; // already had it (cannot happen after a clean resume)
        this.delivered = n;
        return this.emit("message", { kind: "delivery", n, data: "data_b64" in m ? m.data_b64 : m.data });
      }
      case "ack": {
        const p = this.pending.get(Number(m.id));
        if (p) {
          this.pending.delete(p.id);
          p.resolve({ duplicate: m.duplicate === true });
        }
        return;
      }
      case "error": {
        const e = new SwitchyardError(String(m.code), String(m.message));
        if (m.id !== undefined) {
          const p = this.pending.get(Number(m.id));
          if (p) {
            this.pending.delete(p.id);
            p.reject(e);
            return;
          }
        }
        return this.emit("error", { code: e.code, message: e.message });
      }
      case "subscribed":
        return this.onSubscribed(m);
      case "pong":
      case "unsubscribed":
        return;
      default:
        if (typeof m.channel === "string") {
          const c = this.channels.get(m.channel);
          const offset = typeof m.offset === "number" ? m.offset : undefined;
          if (c && offset !== undefined) {
            if (c.offset !== undefined && offset <= c.offset) return; // seen already
            c.offset = offset;
          }
          this.emit("message", { kind: "channel", channel: m.channel, offset, data: "data_b64" in m ? m.data_b64 : m.data });
        }
    }
  }

  private onWelcome(m: Record<string, unknown>, url: string): void {
    const session = String(m.session);
    const asked = this.session !== undefined;
    const resumed = m.resumed === true;
    if (asked) this.emit("resumed", { session, resumed, reason: typeof m.reason === "string" ? m.reason : undefined });
    if (asked && !resumed) {
      // A new session: what the old one had not acknowledged may or may not have reached
      // the backend, and the server cannot tell duplicates apart any more.
      this.delivered = 0;
      for (const p of this.pending.values()) {
        if (p.sent) {
          this.pending.delete(p.id);
          p.reject(new SwitchyardError("session_lost", "the session could not be resumed; resend if needed"));
        }
      }
    }
    this.session = session;
    this.resumeToken = typeof m.resume_token === "string" ? m.resume_token : undefined;
    this.connectedAt = Date.now();
    this.setState("connected");
    this.emit("connected", { url, session, resumed });
    // Everything unacknowledged goes (again) with its original id: a duplicate is acked, not
    // published twice. Then every channel, from where it stopped.
    for (const p of this.pending.values()) {
      p.sent = true;
      this.ws?.send(p.frame);
    }
    for (const [channel, c] of this.channels) this.sendSubscribe(channel, c);
  }

  private onSubscribed(m: Record<string, unknown>): void {
    const channel = String(m.channel);
    const c = this.channels.get(channel);
    const s: Subscribed = {
      channel,
      epoch: typeof m.epoch === "string" ? m.epoch : undefined,
      offset: typeof m.offset === "number" ? m.offset : undefined,
      recovered: typeof m.recovered === "boolean" ? m.recovered : undefined,
    };
    if (c) {
      if (s.recovered !== undefined) {
        this.emit("recovered", { channel, recovered: s.recovered, epoch: s.epoch, offset: s.offset });
      }
      // A new log, or a fresh start: carry on from what the server has now.
      if (s.epoch !== c.epoch || s.recovered === false || c.offset === undefined) {
        c.epoch = s.epoch;
        if (s.recovered !== true && c.rewind === undefined) c.offset = s.offset;
      }
      c.rewind = undefined;
      for (const w of c.waiters.splice(0)) w(s);
    }
    this.emit("subscribed", s);
  }

  private sendSubscribe(channel: string, c: Chan): void {
    const op: Record<string, unknown> = { op: "subscribe", channel };
    if (c.epoch !== undefined && c.offset !== undefined) op.since = { offset: c.offset, epoch: c.epoch };
    else if (c.rewind !== undefined) op.rewind = c.rewind;
    this.raw(op);
  }

  private onClose(code: number, reason: string): void {
    this.clearTimers();
    if (this.stopped) return;
    // The backoff starts over only after a connection that lasted: a server that accepts and
    // closes at once must not get a tight reconnect loop.
    if (this.connectedAt && Date.now() - this.connectedAt >= STABLE_MS) this.attempt = 0;
    this.connectedAt = 0;
    // Codes that must not be retried as they are (docs in README).
    if (code === 1008 || code === 1009) {
      this.emit("disconnected", { code, reason, willRetry: false });
      this.emit("error", { code: `closed_${code}`, message: `the server closed with ${code}: ${reason}` });
      this.failPending(`closed_${code}`, reason);
      this.stopped = true;
      this.setState("closed");
      return;
    }
    if (code === 4001 && !this.o.getToken) {
      this.emit("disconnected", { code, reason, willRetry: false });
      this.emit("error", { code: "token_expired", message: "the token expired and there is no getToken" });
      this.failPending("token_expired", reason);
      this.stopped = true;
      this.setState("closed");
      return;
    }
    if (code === 1000 || (code >= 4000 && code < 5000 && code !== 4001 && code !== 4008)) {
      // The server ended the session on purpose (a backend or the admin API): final.
      this.emit("disconnected", { code, reason, willRetry: false });
      this.failPending("closed", reason);
      this.stopped = true;
      this.setState("closed");
      return;
    }
    this.retry(code, reason);
  }

  private retry(code: number, reason: string): void {
    const max = this.o.backoff.maxAttempts ?? Infinity;
    if (this.attempt >= max) {
      this.emit("disconnected", { code, reason, willRetry: false });
      this.emit("error", { code: "gave_up", message: `no connection after ${this.attempt} attempts` });
      this.failPending("gave_up", "no connection");
      this.stopped = true;
      this.setState("closed");
      return;
    }
    let delay = Client.backoffDelay(this.attempt, this.o.backoff, this.o.random);
    // A fresh token after an expiry is worth one immediate try, not a backoff; a drain
    // (1012) means another edge is ready now.
    if ((code === 4001 && Date.now() - this.tokenAge > 5000) || (code === 1012 && this.attempt === 0)) delay = 0;
    // A slow consumer waits at least a little: its backlog was the problem.
    if (code === 4008) delay = Math.max(delay, this.o.backoff.base ?? 250);
    this.attempt += 1;
    this.urlIndex += 1; // failover: the next edge
    this.emit("disconnected", { code, reason, willRetry: true, delay });
    this.setState("reconnecting");
    this.timer = setTimeout(() => void this.open(), delay);
  }

  private clearTimers(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    if (this.pinger !== undefined) clearInterval(this.pinger);
    this.timer = undefined;
    this.pinger = undefined;
  }

  private failPending(code: string, message: string): void {
    for (const p of this.pending.values()) p.reject(new SwitchyardError(code, message));
    this.pending.clear();
  }

  private enqueue(op: Record<string, unknown>): Promise<{ duplicate: boolean }> {
    if (this._state === "closed") return Promise.reject(new SwitchyardError("closed", "the client is closed"));
    const id = this.nextId++;
    const frame = JSON.stringify({ ...op, id });
    if (frame.length > this.o.maxMessageSize) {
      return Promise.reject(new SwitchyardError("too_big", `message of ${frame.length} bytes over maxMessageSize`));
    }
    const online = this._state === "connected" && this.ws?.readyState === OPEN;
    if (!online && [...this.pending.values()].filter((p) => !p.sent).length >= this.o.offlineQueue) {
      return Promise.reject(new SwitchyardError("offline_queue_full", `${this.o.offlineQueue} messages wait already`));
    }
    return new Promise((resolve, reject) => {
      const p: Pending = { id, frame, resolve, reject, sent: online };
      this.pending.set(id, p);
      if (online) this.ws?.send(frame);
    });
  }

  /** Sends `data` to the route's backend; resolves once the bus has taken it. */
  send(data: unknown): Promise<{ duplicate: boolean }> {
    return this.enqueue({ op: "send", data });
  }

  /** Publishes `data` on `channel` (routes with `allow_publish`). */
  publish(channel: string, data: unknown): Promise<{ duplicate: boolean }> {
    return this.enqueue({ op: "publish", channel, data });
  }

  /** Subscribes (and resubscribes after every reconnect, recovering what was missed). */
  subscribe(channel: string, opts: SubscribeOptions = {}): Promise<Subscribed> {
    let c = this.channels.get(channel);
    if (!c) {
      c = { waiters: [], rewind: opts.rewind };
      this.channels.set(channel, c);
    }
    const chan = c;
    const p = new Promise<Subscribed>((resolve) => chan.waiters.push(resolve));
    if (this._state === "connected") this.sendSubscribe(channel, chan);
    return p;
  }

  /** Stops a subscription. */
  unsubscribe(channel: string): void {
    if (this.channels.delete(channel)) this.raw({ op: "unsubscribe", channel });
  }
}
