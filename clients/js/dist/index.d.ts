/** The WebSocket constructor the client uses (the browser's, or e.g. `ws` in Node.js). */
export interface WebSocketLike {
    readonly readyState: number;
    readonly protocol: string;
    onopen: ((ev: unknown) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
    onerror: ((ev: unknown) => void) | null;
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
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
export type Message = {
    kind: "channel";
    channel: string;
    offset?: number;
    data: unknown;
} | {
    kind: "delivery";
    n: number;
    data: unknown;
};
export interface Events {
    connecting: {
        url: string;
        attempt: number;
    };
    connected: {
        url: string;
        session: string;
        resumed: boolean;
    };
    disconnected: {
        code: number;
        reason: string;
        willRetry: boolean;
        delay?: number;
    };
    resumed: {
        session: string;
        resumed: boolean;
        reason?: string;
    };
    subscribed: Subscribed;
    recovered: {
        channel: string;
        recovered: boolean;
        epoch?: string;
        offset?: number;
    };
    message: Message;
    error: {
        code: string;
        message: string;
    };
    state: {
        state: State;
    };
}
/** A send, publish or subscribe the server refused, or the client could not carry out. */
export declare class SwitchyardError extends Error {
    readonly code: string;
    constructor(code: string, message: string);
}
type Listener<K extends keyof Events> = (ev: Events[K]) => void;
/** One client: one logical session over successive sockets. */
export declare class Client {
    private readonly o;
    private readonly urls;
    private readonly WS;
    private ws;
    private _state;
    private urlIndex;
    private attempt;
    private timer;
    private pinger;
    private lastHeard;
    private session;
    private resumeToken;
    private delivered;
    private nextId;
    private readonly pending;
    private readonly channels;
    private readonly listeners;
    private tokenAge;
    private connectedAt;
    private stopped;
    constructor(options: Options);
    /** The connection's state. */
    get state(): State;
    /** The session id (kept across resumes), once connected. */
    get sessionId(): string | undefined;
    /** Backend deliveries received in this session (the last `n`). */
    get deliveries(): number;
    on<K extends keyof Events>(event: K, fn: Listener<K>): () => void;
    private emit;
    private setState;
    /** Connects (and keeps reconnecting until `close`). */
    connect(): void;
    /** Closes for good: no reconnect; pending sends are refused. */
    close(): void;
    /** The delay before reconnect attempt `attempt` (0-based): full jitter. */
    static backoffDelay(attempt: number, b: Backoff, random?: () => number): number;
    private open;
    private tick;
    private raw;
    private onText;
    private onWelcome;
    private onSubscribed;
    private sendSubscribe;
    private onClose;
    private retry;
    private clearTimers;
    private failPending;
    private enqueue;
    /** Sends `data` to the route's backend; resolves once the bus has taken it. */
    send(data: unknown): Promise<{
        duplicate: boolean;
    }>;
    /** Publishes `data` on `channel` (routes with `allow_publish`). */
    publish(channel: string, data: unknown): Promise<{
        duplicate: boolean;
    }>;
    /** Subscribes (and resubscribes after every reconnect, recovering what was missed). */
    subscribe(channel: string, opts?: SubscribeOptions): Promise<Subscribed>;
    /** Stops a subscription. */
    unsubscribe(channel: string): void;
}
export {};
