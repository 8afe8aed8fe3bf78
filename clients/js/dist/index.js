// Switchyard client for the framed protocol (`switchyard.v2`): failover between edges,
// reconnect with exponential backoff and full jitter, dead-connection detection, session
// resume, channel recovery, acknowledged sends with resend and server-side de-duplication,
// a bounded offline queue, and token refresh. Zero dependencies; browsers and Node.js >= 20
// (pass `WebSocket` where there is no global one, e.g. from the `ws` package).
/** A send, publish or subscribe the server refused, or the client could not carry out. */
export class SwitchyardError extends Error {
    constructor(code, message) {
        super(message);
        this.code = code;
        this.name = "SwitchyardError";
    }
}
const OPEN = 1;
/** A connection that lasted this long (ms) resets the backoff. */
const STABLE_MS = 5000;
/** One client: one logical session over successive sockets. */
export class Client {
    constructor(options) {
        this.ws = null;
        this._state = "idle";
        this.urlIndex = 0;
        this.attempt = 0;
        this.lastHeard = 0;
        this.delivered = 0;
        this.nextId = 1;
        this.pending = new Map();
        this.channels = new Map();
        this.listeners = {};
        this.tokenAge = 0;
        this.connectedAt = 0;
        this.stopped = false;
        const WS = options.WebSocket ?? globalThis.WebSocket;
        if (!WS)
            throw new SwitchyardError("no_websocket", "no global WebSocket: pass options.WebSocket");
        this.WS = WS;
        this.urls = Array.isArray(options.urls) ? options.urls.slice() : [options.urls];
        if (this.urls.length === 0)
            throw new SwitchyardError("no_url", "options.urls is empty");
        this.o = {
            backoff: {},
            pingInterval: 10000,
            silenceTimeout: 25000,
            offlineQueue: 1000,
            maxMessageSize: 1 << 20,
            random: Math.random,
            ...options,
        };
    }
    /** The connection's state. */
    get state() {
        return this._state;
    }
    /** The session id (kept across resumes), once connected. */
    get sessionId() {
        return this.session;
    }
    /** Backend deliveries received in this session (the last `n`). */
    get deliveries() {
        return this.delivered;
    }
    on(event, fn) {
        var _a;
        const list = ((_a = this.listeners)[event] ?? (_a[event] = []));
        list.push(fn);
        return () => {
            const i = list.indexOf(fn);
            if (i >= 0)
                list.splice(i, 1);
        };
    }
    emit(event, ev) {
        for (const fn of (this.listeners[event] ?? [])) {
            try {
                fn(ev);
            }
            catch {
                // A listener's exception is its own business.
            }
        }
    }
    setState(s) {
        if (this._state !== s) {
            this._state = s;
            this.emit("state", { state: s });
        }
    }
    /** Connects (and keeps reconnecting until `close`). */
    connect() {
        this.stopped = false;
        if (this._state === "idle" || this._state === "closed")
            void this.open();
    }
    /** Closes for good: no reconnect; pending sends are refused. */
    close() {
        this.stopped = true;
        this.clearTimers();
        const ws = this.ws;
        this.ws = null;
        if (ws)
            ws.close(1000, "client closed");
        this.failPending("closed", "the client was closed");
        this.setState("closed");
    }
    /** The delay before reconnect attempt `attempt` (0-based): full jitter. */
    static backoffDelay(attempt, b, random = Math.random) {
        const base = b.base ?? 250;
        const cap = b.cap ?? 15000;
        return Math.floor(random() * Math.min(cap, base * 2 ** Math.min(attempt, 30)));
    }
    async open() {
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
            }
            catch (e) {
                this.emit("error", { code: "token", message: `getToken failed: ${String(e)}` });
                return this.retry(1006, "getToken failed");
            }
        }
        if (this.stopped)
            return;
        if (token)
            protocols.push(`bearer.${token}`);
        let target = url;
        if (this.session && this.resumeToken) {
            const q = `resume=${encodeURIComponent(this.resumeToken)}&delivered=${this.delivered}`;
            target += (url.includes("?") ? "&" : "?") + q;
        }
        let ws;
        try {
            ws = new this.WS(target, protocols);
        }
        catch (e) {
            this.emit("error", { code: "connect", message: String(e) });
            return this.retry(1006, "cannot open");
        }
        this.ws = ws;
        this.lastHeard = Date.now();
        // Dead connection: no answer at all (not even to the upgrade) within the silence timeout.
        this.pinger = setInterval(() => this.tick(), Math.min(this.o.pingInterval, this.o.silenceTimeout / 2));
        ws.onmessage = (ev) => {
            if (this.ws !== ws)
                return;
            this.lastHeard = Date.now();
            if (typeof ev.data === "string")
                this.onText(ev.data, url);
        };
        ws.onclose = (ev) => {
            if (this.ws !== ws)
                return;
            this.ws = null;
            this.onClose(ev.code, ev.reason);
        };
        ws.onerror = () => {
            // Always followed by a close.
        };
    }
    tick() {
        const ws = this.ws;
        if (!ws)
            return;
        if (Date.now() - this.lastHeard > this.o.silenceTimeout) {
            // Silent: treat as dead (a half-open TCP connection never closes by itself).
            this.ws = null;
            try {
                ws.close(4000, "silence");
            }
            catch {
                // Already closing.
            }
            this.onClose(1006, "no message within the silence timeout");
            return;
        }
        if (ws.readyState === OPEN)
            this.raw({ op: "ping" });
    }
    raw(op) {
        const ws = this.ws;
        if (ws && ws.readyState === OPEN)
            ws.send(JSON.stringify(op));
    }
    onText(text, url) {
        let m;
        try {
            m = JSON.parse(text);
        }
        catch {
            return;
        }
        switch (m.op) {
            case "welcome":
                return this.onWelcome(m, url);
            case "deliver": {
                const n = Number(m.n);
                if (n <= this.delivered)
                    return; // already had it (cannot happen after a clean resume)
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
                        if (c.offset !== undefined && offset <= c.offset)
                            return; // seen already
                        c.offset = offset;
                    }
                    this.emit("message", { kind: "channel", channel: m.channel, offset, data: "data_b64" in m ? m.data_b64 : m.data });
                }
        }
    }
    onWelcome(m, url) {
        const session = String(m.session);
        const asked = this.session !== undefined;
        const resumed = m.resumed === true;
        if (asked)
            this.emit("resumed", { session, resumed, reason: typeof m.reason === "string" ? m.reason : undefined });
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
        for (const [channel, c] of this.channels)
            this.sendSubscribe(channel, c);
    }
    onSubscribed(m) {
        const channel = String(m.channel);
        const c = this.channels.get(channel);
        const s = {
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
                if (s.recovered !== true && c.rewind === undefined)
                    c.offset = s.offset;
            }
            c.rewind = undefined;
            for (const w of c.waiters.splice(0))
                w(s);
        }
        this.emit("subscribed", s);
    }
    sendSubscribe(channel, c) {
        const op = { op: "subscribe", channel };
        if (c.epoch !== undefined && c.offset !== undefined)
            op.since = { offset: c.offset, epoch: c.epoch };
        else if (c.rewind !== undefined)
            op.rewind = c.rewind;
        this.raw(op);
    }
    onClose(code, reason) {
        this.clearTimers();
        if (this.stopped)
            return;
        // The backoff starts over only after a connection that lasted: a server that accepts and
        // closes at once must not get a tight reconnect loop.
        if (this.connectedAt && Date.now() - this.connectedAt >= STABLE_MS)
            this.attempt = 0;
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
    retry(code, reason) {
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
        if ((code === 4001 && Date.now() - this.tokenAge > 5000) || (code === 1012 && this.attempt === 0))
            delay = 0;
        // A slow consumer waits at least a little: its backlog was the problem.
        if (code === 4008)
            delay = Math.max(delay, this.o.backoff.base ?? 250);
        this.attempt += 1;
        this.urlIndex += 1; // failover: the next edge
        this.emit("disconnected", { code, reason, willRetry: true, delay });
        this.setState("reconnecting");
        this.timer = setTimeout(() => void this.open(), delay);
    }
    clearTimers() {
        if (this.timer !== undefined)
            clearTimeout(this.timer);
        if (this.pinger !== undefined)
            clearInterval(this.pinger);
        this.timer = undefined;
        this.pinger = undefined;
    }
    failPending(code, message) {
        for (const p of this.pending.values())
            p.reject(new SwitchyardError(code, message));
        this.pending.clear();
    }
    enqueue(op) {
        if (this._state === "closed")
            return Promise.reject(new SwitchyardError("closed", "the client is closed"));
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
            const p = { id, frame, resolve, reject, sent: online };
            this.pending.set(id, p);
            if (online)
                this.ws?.send(frame);
        });
    }
    /** Sends `data` to the route's backend; resolves once the bus has taken it. */
    send(data) {
        return this.enqueue({ op: "send", data });
    }
    /** Publishes `data` on `channel` (routes with `allow_publish`). */
    publish(channel, data) {
        return this.enqueue({ op: "publish", channel, data });
    }
    /** Subscribes (and resubscribes after every reconnect, recovering what was missed). */
    subscribe(channel, opts = {}) {
        let c = this.channels.get(channel);
        if (!c) {
            c = { waiters: [], rewind: opts.rewind };
            this.channels.set(channel, c);
        }
        const chan = c;
        const p = new Promise((resolve) => chan.waiters.push(resolve));
        if (this._state === "connected")
            this.sendSubscribe(channel, chan);
        return p;
    }
    /** Stops a subscription. */
    unsubscribe(channel) {
        if (this.channels.delete(channel))
            this.raw({ op: "unsubscribe", channel });
    }
}
