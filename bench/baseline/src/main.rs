//! `switchyard-baseline`: the naive peer of the benchmark comparison in BENCHMARKS.md.
//!
//! What a competent developer writes in an afternoon with axum 0.8 + tokio-tungstenite +
//! `tokio::sync::broadcast`, with library defaults and no tuning: one task per socket that
//! `select!`s over the socket and one broadcast receiver, one `send` (write + flush) per message,
//! the channel message encoded once per publish and cloned (a refcount) per receiver. It speaks
//! the subset of Switchyard's framed protocol the load generator uses:
//!
//! - `/ws`: `{"op":"welcome","session":ID}` first; `{"op":"subscribe","channel":C}` →
//!   `{"op":"subscribed","channel":C}` (one channel per socket: a new subscribe replaces the
//!   old one); `{"op":"publish","channel":C,"data":D}` → every subscriber of C gets
//!   `{"channel":C,"offset":N,"data":D}`. A receiver that lags more than the broadcast capacity
//!   (1024, Switchyard's default queue) loses the oldest messages, like Switchyard's
//!   `drop_oldest`.
//! - `/ws/echo`: every frame goes to one "backend" task, which routes it back to the sending
//!   session through a session map (the naive version of Switchyard's unicast path).
//!
//! Run with: `target/release/switchyard-baseline --listen 127.0.0.1:8090`

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc};

/// Capacity of each channel's broadcast ring (messages).
const CAPACITY: usize = 1024;

#[derive(Parser)]
#[command(
    version,
    about = "Naive axum + broadcast WebSocket fan-out server (benchmark baseline)"
)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

struct Channel {
    tx: broadcast::Sender<Utf8Bytes>,
    offset: u64,
}

struct AppState {
    channels: Mutex<HashMap<String, Channel>>,
    /// Echo route: session id → that socket's outgoing messages.
    sessions: Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>,
    /// Echo route: frames to the backend task.
    backend: mpsc::UnboundedSender<(u64, Message)>,
    next_id: AtomicU64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let (backend_tx, backend_rx) = mpsc::unbounded_channel();
    let st = Arc::new(AppState {
        channels: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        backend: backend_tx,
        next_id: AtomicU64::new(1),
    });
    tokio::spawn(backend(st.clone(), backend_rx));
    let app = Router::new()
        .route("/ws", get(framed_upgrade))
        .route("/ws/echo", get(echo_upgrade))
        .with_state(st);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("switchyard-baseline listening on {}", args.listen);
    axum::serve(listener, app).await
}

async fn framed_upgrade(ws: WebSocketUpgrade, State(st): State<Arc<AppState>>) -> Response {
    ws.on_upgrade(move |socket| framed(socket, st))
}

async fn echo_upgrade(ws: WebSocketUpgrade, State(st): State<Arc<AppState>>) -> Response {
    ws.on_upgrade(move |socket| echo(socket, st))
}

fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

/// Waits on the subscription if there is one, forever otherwise.
async fn next_on(sub: &mut Option<broadcast::Receiver<Utf8Bytes>>) -> Result<Utf8Bytes, broadcast::error::RecvError> {
    match sub {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn framed(mut socket: WebSocket, st: Arc<AppState>) {
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let welcome = serde_json::json!({"op": "welcome", "session": id.to_string()});
    if socket.send(text(welcome.to_string())).await.is_err() {
        return;
    }
    let mut sub: Option<broadcast::Receiver<Utf8Bytes>> = None;
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Some(reply) = handle_op(&st, &t, &mut sub) {
                        if socket.send(text(reply)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            r = next_on(&mut sub) => match r {
                Ok(msg) => {
                    if socket.send(Message::Text(msg)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => sub = None,
            },
        }
    }
}

/// Handles one framed op; returns the reply to send, if any.
fn handle_op(st: &AppState, frame: &str, sub: &mut Option<broadcast::Receiver<Utf8Bytes>>) -> Option<String> {
    let err =
        |code: &str, msg: &str| Some(serde_json::json!({"op": "error", "code": code, "message": msg}).to_string());
    let Ok(v) = serde_json::from_str::<serde_json::Value>(frame) else {
        return err("bad_request", "not JSON");
    };
    let channel = v["channel"].as_str().unwrap_or_default().to_owned();
    match v["op"].as_str() {
        Some("subscribe") if !channel.is_empty() => {
            let mut chans = st.channels.lock().unwrap();
            let c = chans.entry(channel.clone()).or_insert_with(|| Channel {
                tx: broadcast::channel(CAPACITY).0,
                offset: 0,
            });
            *sub = Some(c.tx.subscribe());
            Some(serde_json::json!({"op": "subscribed", "channel": channel}).to_string())
        }
        Some("publish") if !channel.is_empty() => {
            let mut chans = st.channels.lock().unwrap();
            if let Some(c) = chans.get_mut(&channel) {
                let msg = serde_json::json!({"channel": channel, "offset": c.offset, "data": v["data"]});
                c.offset += 1;
                // No receivers is not an error for a publisher.
                let _ = c.tx.send(Utf8Bytes::from(msg.to_string()));
            }
            None
        }
        Some("subscribe" | "publish") => err("bad_request", "missing channel"),
        _ => err("unknown_op", "unknown op"),
    }
}

/// Echo route: frames go to the backend task and come back through the session map.
async fn echo(mut socket: WebSocket, st: Arc<AppState>) {
    let id = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    st.sessions.lock().unwrap().insert(id, tx);
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    let _ = st.backend.send((id, m));
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some(m) = rx.recv() => {
                if socket.send(m).await.is_err() {
                    break;
                }
            }
        }
    }
    st.sessions.lock().unwrap().remove(&id);
}

/// The echo "backend": answers every frame with the same frame, routed by session id.
async fn backend(st: Arc<AppState>, mut rx: mpsc::UnboundedReceiver<(u64, Message)>) {
    while let Some((id, m)) = rx.recv().await {
        let out = st.sessions.lock().unwrap().get(&id).cloned();
        if let Some(tx) = out {
            let _ = tx.send(m);
        }
    }
}
