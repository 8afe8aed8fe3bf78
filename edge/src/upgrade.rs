//! The handshake: every check before a socket exists (route, WebSocket handshake, draining,
//! Origin, caps, authentication), the 101, and the session's task on the upgraded socket.

use crate::admit::{refuse, ConnSlot};
use crate::metrics as m;
use crate::session::{self, Session};
use crate::state::{EdgeState, Route};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use switchyard_protocol::envelope::now_ms;
use switchyard_protocol::{framed, resume, TraceContext};
use tracing::Instrument;

/// How long a resume token stays valid after the handshake that issued it (each resume
/// issues a new one). The resume window, not this, bounds how long a session waits.
pub const RESUME_TOKEN_TTL_SECS: u64 = 24 * 3600;

/// The resume a handshake asks for: `?resume=TOKEN&delivered=N`, or the headers
/// `x-switchyard-resume` / `x-switchyard-delivered` (either form on any route).
fn resume_request<'a>(query: Option<&'a str>, headers: &'a HeaderMap) -> Option<(&'a str, Option<u64>)> {
    let param = |name: &str| {
        query?
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = param("resume").or_else(|| header("x-switchyard-resume"))?;
    let delivered = param("delivered")
        .or_else(|| header("x-switchyard-delivered"))
        .and_then(|v| v.trim().parse().ok());
    Some((token, delivered))
}

/// What a resume takes over: the session's id, continuity, inbound seq and channels.
struct Taken {
    id: String,
    cont: Arc<session::resume::Continuity>,
    seq: u64,
    channels: std::collections::HashSet<String>,
}

/// Takes a session over for a resume, or says why not (the reason the client sees): a parked
/// session of this node (one whose old socket still looks alive is closed there, 1001, and
/// taken once parked), or one the token's node hands over (crate::handover).
async fn try_resume(
    st: &Arc<EdgeState>,
    route: &Arc<Route>,
    subject: Option<&str>,
    token: &str,
    delivered: Option<u64>,
) -> Result<(Taken, u64), &'static str> {
    if st.cfg.resume_window.is_zero() {
        return Err("resume_off");
    }
    let claims =
        resume::verify(&st.resume_key, token, &route.cfg.path, subject, now_ms() / 1000).map_err(|e| e.code())?;
    let delivered = delivered.ok_or("bad_delivered")?;
    let Some(old) = st.sessions.get(&claims.session).map(|s| s.clone()) else {
        let Some(node) = claims.node.as_deref() else {
            return Err("not_parked");
        };
        let from_log = claims.anchor.is_some() && st.logged;
        let issued_ms = claims.expires.saturating_sub(RESUME_TOKEN_TTL_SECS) * 1000;
        let r = if node != st.cfg.node_id {
            match crate::handover::request(st, node, &claims.session, &route.cfg.path, delivered).await {
                // Its node did not answer (killed?): from the bus's log, where it keeps one.
                Err("node_unreachable") if from_log => {
                    crate::handover::log::recover(st, node, &claims, route, delivered, issued_ms).await?
                }
                r => r?,
            }
        } else if from_log {
            // Issued by this node before it restarted (same --node-id): from its log too.
            crate::handover::log::recover(st, node, &claims, route, delivered, issued_ms).await?
        } else {
            return Err("not_parked");
        };
        let taken = Taken {
            id: claims.session,
            cont: r.cont,
            seq: r.seq,
            channels: r.channels,
        };
        return Ok((taken, delivered));
    };
    if !old.take_from_socket("resumed on another connection").await {
        return Err("not_parked");
    }
    old.cont.take(delivered).map_err(|e| e.code())?;
    let taken = Taken {
        id: old.id.clone(),
        cont: old.cont.clone(),
        seq: old.seq(),
        // A raw session kept its channels while away; its new socket takes them over.
        channels: old.channels.lock().clone(),
    };
    Ok((taken, delivered))
}

/// Does a comma-separated header hold `token` (case-insensitive)?
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Every check before a socket exists, cheapest first: route (404), WebSocket handshake
/// (400/426), draining (503), Origin (403), connection rate and caps (429/503),
/// authentication (401), per-user cap (429). Then the 101 and, on its own task, the session.
pub(crate) async fn upgrade(
    State(st): State<Arc<EdgeState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
) -> Response {
    let (mut parts, _body) = req.into_parts();
    let headers = &parts.headers;
    if let Some(page) = &st.cfg.page {
        if let Some(r) = serve_page(page, &parts.method, parts.uri.path(), headers) {
            return r;
        }
    }
    let Some(route) = st.routes.get(parts.uri.path()).cloned() else {
        metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => "unknown_path").increment(1);
        return (StatusCode::NOT_FOUND, "no such route\n").into_response();
    };
    // RFC 6455 §4.2.1.
    let is_ws = parts.method == Method::GET
        && has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes().to_vec());
    let (Some(key), true) = (key, is_ws) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade\n",
        );
    };
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "ws_version",
            "WebSocket version 13 only\n",
        );
        r.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "connection cannot be upgraded\n",
        );
    };
    if st.shutdown.is_cancelled() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "draining", "node is shutting down\n");
    }
    // Exact Origin match: no suffix, prefix or `null` tricks.
    if !route.cfg.allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| route.cfg.allowed_origins.iter().any(|a| a == o)) {
            return refuse(StatusCode::FORBIDDEN, "origin", "origin not allowed\n");
        }
    }
    // The connection's cap slot, taken at accept; the first upgrade on it takes it over.
    let Some(mut slot) = parts.extensions.get::<ConnSlot>().and_then(|c| c.0.lock().take()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "connection already upgraded\n",
        );
    };
    let verified = match &route.verifier {
        Some(v) => match v.verify(headers, parts.uri.query()) {
            Ok(v) => Some(v),
            Err(r) => {
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::UNAUTHORIZED);
                return refuse(status, r.reason, "unauthorized\n");
            }
        },
        None => None,
    };
    if let Some(v) = &verified {
        if let Err(r) = slot.add_user(&route.cfg.path, &v.identity.subject) {
            return r;
        }
    }
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|tp| {
            let ts = headers.get("tracestate").and_then(|v| v.to_str().ok());
            TraceContext::parse(tp, ts).ok()
        })
        .unwrap_or_else(new_trace);
    // `switchyard.v2` (framed routes): deliveries are wrapped and numbered.
    let v2 = route.is_framed() && has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, "switchyard.v2");
    let offered_v1 = !v2 && has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, "switchyard.v1");
    let subject = verified.as_ref().map(|v| v.identity.subject.clone());
    let asked = resume_request(parts.uri.query(), headers);
    let resumed: Option<Result<(Taken, u64), &str>> = match asked {
        Some((token, delivered)) => Some(try_resume(&st, &route, subject.as_deref(), token, delivered).await),
        None => None,
    };
    if let Some(r) = &resumed {
        let result = match r {
            Ok(_) => "resumed",
            Err(why) => why,
        };
        metrics::counter!(m::RESUMES, "result" => result).increment(1);
    }
    let (resumed, old) = match resumed {
        Some(Ok((taken, delivered))) => (Some(Ok(())), Some((taken, delivered))),
        Some(Err(why)) => (Some(Err(why)), None),
        None => (None, None),
    };
    let id = old
        .as_ref()
        .map_or_else(|| ulid::Ulid::new().to_string(), |(o, _)| o.id.clone());
    let span = tracing::info_span!("session", session = %id, route = %route.cfg.path, trace_id = %trace.trace_id());
    let mut sess = Session::new(id.clone(), route.clone(), trace);
    sess.v2 = v2;
    let resume_on = !st.cfg.resume_window.is_zero();
    match &old {
        Some((o, delivered)) => {
            sess.cont = o.cont.clone();
            sess.continue_seq(o.seq);
            sess.resumed_after = Some(*delivered);
            *sess.channels.lock() = o.channels.clone();
        }
        None => {
            let keep = if resume_on { st.cfg.resume_buffer } else { 0 };
            sess.cont = Arc::new(session::resume::Continuity::new(keep));
            if st.logged {
                // Its deliveries will be this node's log's records for it from here on.
                sess.cont.start_at(st.log_point());
            }
        }
    }
    let resume_token = resume_on.then(|| {
        resume::issue(
            &st.resume_key,
            &resume::Claims {
                session: id.clone(),
                route: route.cfg.path.clone(),
                subject: subject.clone(),
                expires: now_ms() / 1000 + RESUME_TOKEN_TTL_SECS,
                node: Some(st.cfg.node_id.clone()),
                anchor: st.logged.then(|| sess.cont.anchor()).flatten(),
                // A raw session's channel messages are deliveries the node's log does not hold.
                channels: !route.is_framed() && !sess.channels.lock().is_empty(),
            },
        )
    });
    if route.is_framed() {
        sess.welcome = Some(framed::welcome_with(
            &id,
            &framed::Welcome {
                resumed: resumed.map(|r| r.is_ok()),
                reason: resumed.and_then(|r| r.err()),
                resume_token: resume_token.as_deref(),
            },
        ));
    }
    if let Some(v) = verified {
        sess.identity = Some(v.identity);
        sess.expires_at = v.expires_at;
        sess.grants = v.grants;
    }
    let sess = Arc::new(sess);
    let token = st.tracker.token();
    let st2 = st.clone();
    let fut = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                tracing::debug!(%peer, "session opened");
                match upgraded.downcast::<hyper_util::rt::TokioIo<tokio::net::TcpStream>>() {
                    // Plain TCP: the write half is shared with the queue's direct path.
                    Ok(parts) => {
                        let (r, w) = parts.io.into_inner().into_split();
                        let w = Arc::new(w);
                        sess.queue.set_direct(w.clone());
                        let r = Prefixed::new(parts.read_buf, r);
                        session::run(st2, sess, r, crate::queue::SharedTcp(w)).await;
                    }
                    // TLS: everything is written by the session's writer.
                    Err(upgraded) => {
                        let (r, w) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
                        session::run(st2, sess, r, w).await;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                if sess.resumed_after.is_some() {
                    session::abandon(&st2, &sess, "resume upgrade failed").await;
                }
            }
        }
        drop(token);
        drop(slot);
    };
    tokio::spawn(fut.instrument(span));
    metrics::counter!(m::HANDSHAKES, "route" => route.cfg.path.clone()).increment(1);
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            tungstenite::handshake::derive_accept_key(&key),
        )
        .body(axum::body::Body::empty())
        .expect("static response parts");
    if v2 || offered_v1 {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(if v2 { "switchyard.v2" } else { "switchyard.v1" }),
        );
    }
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-switchyard-session", v);
    }
    if let Some(r) = &resumed {
        h.insert(
            "x-switchyard-resumed",
            HeaderValue::from_static(if r.is_ok() { "true" } else { "false" }),
        );
        if let Err(why) = r {
            h.insert("x-switchyard-resume-reason", HeaderValue::from_static(why));
        }
    }
    if let Some(t) = resume_token.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert("x-switchyard-resume-token", t);
    }
    resp
}

/// The demo's page: `GET /` and `GET /switchyard.js` (not an upgrade), nothing else.
fn serve_page(page: &crate::config::Page, method: &Method, path: &str, headers: &HeaderMap) -> Option<Response> {
    if method != Method::GET || has_token(headers, header::UPGRADE, "websocket") {
        return None;
    }
    let (body, kind) = match path {
        "/" | "/index.html" => (page.html, "text/html; charset=utf-8"),
        "/switchyard.js" => (page.script, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    // Everything comes from this origin (no CDN, no external fonts); sockets to any edge.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src ws: wss:",
        ),
    );
    Some(r)
}

/// A reader that first yields what the HTTP parser had already read past the upgrade request
/// (a client may send its first frame without waiting for the 101).
pub struct Prefixed<R> {
    head: bytes::Bytes,
    inner: R,
}

impl<R> Prefixed<R> {
    fn new(head: bytes::Bytes, inner: R) -> Self {
        // A copy: the parser's bytes would keep its whole read buffer alive for the session.
        let head = if head.is_empty() {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::copy_from_slice(&head)
        };
        Self { head, inner }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// A fresh W3C trace context for a handshake that brought none.
fn new_trace() -> TraceContext {
    let t = ulid::Ulid::new().0 | 1;
    let s = (ulid::Ulid::new().0 as u64) | 1;
    TraceContext {
        traceparent: format!("00-{t:032x}-{s:016x}-01"),
        tracestate: None,
    }
}
