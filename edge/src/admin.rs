//! The admin listener: health, readiness, Prometheus metrics and a small JSON API. Served on its
//! own address, apart from client traffic.

use crate::state::EdgeState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use switchyard_bus::{Bus, BusError, Record};
use switchyard_protocol::envelope::{now_ms, valid_session};
use switchyard_protocol::{valid_channel, ControlOp, Envelope, Kind, Naming, Opcode};

/// What the admin API can reach in this process.
#[derive(Clone)]
pub struct AdminState {
    pub bus: Arc<dyn Bus>,
    pub naming: Naming,
    /// The edge in this process, if any (session lookups).
    pub edge: Option<Arc<EdgeState>>,
    pub prometheus: PrometheusHandle,
    /// Set when the process starts draining: `/readyz` turns 503.
    pub draining: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/publish", post(publish))
        .route("/api/channels/{channel}/history", get(history))
        .route("/api/sessions/{id}", get(session_info).delete(close_session))
        .route("/api/sessions/{id}/send", post(send))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn bus_err(e: BusError) -> Response {
    let status = match e {
        BusError::Overflow { .. } | BusError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    err(status, e.to_string())
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let bus = s.bus.is_ready();
    let draining = s.draining.load(Ordering::Relaxed);
    let body = json!({"bus": if bus {"up"} else {"down"}, "draining": draining});
    let status = if bus && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    metrics::gauge!(switchyard_bus::metrics::READY, "bus" => s.bus.scheme()).set(if s.bus.is_ready() {
        1.0
    } else {
        0.0
    });
    if let Some(edge) = &s.edge {
        // The resume buffers' occupancy, read at scrape time (not counted per delivery).
        let (mut sum, mut max) = (0usize, 0usize);
        for sess in edge.sessions.iter() {
            let k = sess.cont.kept();
            sum += k;
            max = max.max(k);
        }
        metrics::gauge!(crate::metrics::RESUME_BUFFER).set(sum as f64);
        metrics::gauge!(crate::metrics::RESUME_BUFFER_MAX).set(max as f64);
    }
    ([("content-type", "text/plain; version=0.0.4")], s.prometheus.render()).into_response()
}

/// Parses a JSON body, turning every failure into a 400 with a JSON error.
// The refusal is the response itself (built only when a request is refused).
#[allow(clippy::result_large_err)]
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| err(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<serde_json::value::RawValue>,
}

async fn publish(State(s): State<AdminState>, body: Bytes) -> Response {
    let b: PublishBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !valid_channel(&b.channel) {
        return err(StatusCode::BAD_REQUEST, format!("invalid channel name {:?}", b.channel));
    }
    let mut h = switchyard_protocol::Headers::new();
    h.insert(switchyard_protocol::envelope::header::TIMESTAMP, now_ms().to_string());
    let rec = Record {
        key: None,
        headers: h,
        payload: Bytes::copy_from_slice(b.data.get().as_bytes()),
    };
    match s.bus.publish(&s.naming.channel(&b.channel), rec).await {
        Ok(offset) => (StatusCode::ACCEPTED, Json(json!({"accepted": true, "offset": offset}))).into_response(),
        Err(e) => bus_err(e),
    }
}

/// Most messages one history request returns.
const HISTORY_LIMIT_MAX: usize = 1000;

/// `GET /api/channels/{c}/history?since=N&limit=K`: the retained messages after offset `N`
/// (default 0: from the oldest), at most `K` (default 100, at most 1000).
async fn history(
    State(s): State<AdminState>,
    Path(channel): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if !valid_channel(&channel) {
        return err(StatusCode::BAD_REQUEST, format!("invalid channel name {channel:?}"));
    }
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "since" | "limit")) {
        return err(
            StatusCode::BAD_REQUEST,
            format!("unknown query parameter {k:?} (since, limit)"),
        );
    }
    let number = |name: &'static str, default: u64| match q.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<u64>().map_err(|_| name),
    };
    let (since, limit) = match (number("since", 0), number("limit", 100)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(name), _) | (_, Err(name)) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!("`{name}` must be a non-negative integer"),
            )
        }
    };
    if limit == 0 || limit > HISTORY_LIMIT_MAX as u64 {
        return err(
            StatusCode::BAD_REQUEST,
            format!("`limit` out of range 1..={HISTORY_LIMIT_MAX}"),
        );
    }
    let read = match s
        .bus
        .history(
            &s.naming.channel(&channel),
            switchyard_bus::HistoryQuery::After(since),
            limit as usize,
        )
        .await
    {
        Ok(Some(read)) => read,
        Ok(None) => {
            return err(
                StatusCode::NOT_FOUND,
                format!("channel {channel} keeps no history (no [[channel]] pattern covers it)"),
            )
        }
        Err(e) => return bus_err(e),
    };
    let messages: Vec<Value> = read
        .messages
        .iter()
        .filter_map(|m| {
            let mut v: Value = serde_json::from_str(&switchyard_protocol::framed::channel_message(
                &channel,
                m.offset,
                &m.record.payload,
            ))
            .ok()?;
            v.as_object_mut()?.remove("channel");
            Some(v)
        })
        .collect();
    Json(json!({
        "channel": channel,
        "epoch": read.epoch,
        "offset": read.last,
        "complete": read.complete,
        "messages": messages,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// Any JSON: a string is sent as its text, anything else as its JSON text.
    data: Option<Value>,
    /// Bytes for a binary frame, base64-encoded.
    binary: Option<String>,
}

// The refusal is the response itself (built only when a request is refused).
#[allow(clippy::result_large_err)]
fn check_id(id: &str) -> Result<(), Response> {
    if valid_session(id) {
        Ok(())
    } else {
        Err(err(StatusCode::BAD_REQUEST, "invalid session id"))
    }
}

/// Publishes an outbound record exactly as a backend would: the router delivers it.
async fn outbound(s: &AdminState, env: Envelope) -> Response {
    let rec = Record {
        key: Some(env.key()),
        headers: env.headers(),
        payload: env.payload.clone(),
    };
    match s.bus.publish(&s.naming.outbound(), rec).await {
        Ok(_) => (StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response(),
        Err(e) => bus_err(e),
    }
}

async fn send(State(s): State<AdminState>, Path(id): Path<String>, body: Bytes) -> Response {
    if let Err(r) = check_id(&id) {
        return r;
    }
    let b: SendBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (payload, opcode) = match (b.data, b.binary) {
        (Some(Value::String(t)), None) => (Bytes::from(t), Opcode::Text),
        (Some(v), None) => (Bytes::from(v.to_string()), Opcode::Text),
        (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(b) => (Bytes::from(b), Opcode::Binary),
            Err(_) => return err(StatusCode::BAD_REQUEST, "`binary` is not valid base64"),
        },
        _ => return err(StatusCode::BAD_REQUEST, "give exactly one of `data` or `binary`"),
    };
    let mut env = Envelope::new(id, Kind::Deliver, payload);
    env.opcode = opcode;
    env.timestamp_ms = now_ms();
    outbound(&s, env).await
}

#[derive(Deserialize)]
struct CloseQuery {
    code: Option<u16>,
    reason: Option<String>,
}

async fn close_session(State(s): State<AdminState>, Path(id): Path<String>, Query(q): Query<CloseQuery>) -> Response {
    if let Err(r) = check_id(&id) {
        return r;
    }
    let code = q.code.unwrap_or(1000);
    if !(code == 1000 || (3000..5000).contains(&code)) {
        return err(StatusCode::BAD_REQUEST, "code must be 1000 or 3000..=4999");
    }
    let reason = q.reason.unwrap_or_default();
    if reason.len() > 123 {
        return err(StatusCode::BAD_REQUEST, "reason longer than 123 bytes");
    }
    let mut env = Envelope::new(id, Kind::Control, Bytes::new());
    env.control = Some(ControlOp::Close { code, reason });
    env.timestamp_ms = now_ms();
    outbound(&s, env).await
}

async fn session_info(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    if let Err(r) = check_id(&id) {
        return r;
    }
    let Some(edge) = &s.edge else {
        return err(StatusCode::NOT_FOUND, "this process runs no edge");
    };
    let Some(sess) = edge.sessions.get(&id).map(|s| s.clone()) else {
        return err(StatusCode::NOT_FOUND, "no such session on this node");
    };
    let mut channels: Vec<String> = sess.channels.lock().iter().cloned().collect();
    channels.sort();
    Json(json!({
        "session": sess.id,
        "node": edge.cfg.node_id,
        "route": sess.route.cfg.path,
        "connected_at_ms": sess.connected_at_ms,
        "frames_in": sess.frames_in.load(Ordering::Relaxed),
        "frames_out": sess.frames_out.load(Ordering::Relaxed),
        "queued": sess.queue.len(),
        "channels": channels,
        "traceparent": sess.trace.traceparent,
    }))
    .into_response()
}

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState, stop: tokio_util::sync::CancellationToken) {
    let serve = axum::serve(listener, router(state)).with_graceful_shutdown(async move { stop.cancelled().await });
    if let Err(e) = serve.await {
        tracing::error!(error = %e, "admin listener failed");
    }
}
