//! The client listener: route lookup (404 before any upgrade), the upgrade itself, and the
//! node-level state every session shares.

use crate::channels::ChannelHub;
use crate::config::{EdgeConfig, Mode, RouteConfig};
use crate::metrics as m;
use crate::session::{self, Session};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics::{Counter, Gauge};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use switchyard_bus::{Bus, BusError, SubscribeOptions};
use switchyard_protocol::TraceContext;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// A configured route plus what is derived from it once: its inbound topic and metric handles.
pub struct Route {
    pub cfg: RouteConfig,
    pub verifier: Option<crate::auth::Verifier>,

    pub inbound: String,
    pub max_message_size: usize,
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub open: Gauge,
    pub drop_oldest: Counter,
    pub drop_slow_close: Counter,
    pub drop_bus: Counter,
    /// Frames read after the session was closed for policy or an expired token (not published).
    pub drop_policy: Counter,
    /// The route's per-session message rate, as a governor quota.
    pub rate: Option<Quota>,
}

impl Route {
    fn new(cfg: RouteConfig, edge: &EdgeConfig) -> Result<Self, String> {
        let r = cfg.path.clone();
        let verifier = cfg.auth.as_ref().map(crate::auth::Verifier::load).transpose()?;
        Ok(Self {
            verifier,
            inbound: edge.naming.inbound(&cfg.topic),
            max_message_size: cfg.max_message_size.unwrap_or(edge.max_message_size),
            frames_in: metrics::counter!(m::FRAMES_IN, "route" => r.clone()),
            bytes_in: metrics::counter!(m::BYTES_IN, "route" => r.clone()),
            frames_out: metrics::counter!(m::FRAMES_OUT, "route" => r.clone()),
            bytes_out: metrics::counter!(m::BYTES_OUT, "route" => r.clone()),
            open: metrics::gauge!(m::CONNECTIONS_OPEN, "route" => r.clone()),
            drop_oldest: metrics::counter!(m::DROPS, "route" => r.clone(), "reason" => "slow_drop_oldest"),
            drop_slow_close: metrics::counter!(m::DROPS, "route" => r.clone(), "reason" => "slow_close"),
            drop_bus: metrics::counter!(m::DROPS, "route" => r.clone(), "reason" => "bus_refused"),
            drop_policy: metrics::counter!(m::DROPS, "route" => r, "reason" => "after_policy_close"),
            rate: cfg.rate_limit.map(|rl| {
                let per = std::num::NonZeroU32::new(rl.messages_per_second.max(1)).expect("non-zero");
                let burst =
                    std::num::NonZeroU32::new(rl.burst.unwrap_or(rl.messages_per_second).max(1)).expect("non-zero");
                Quota::per_second(per).allow_burst(burst)
            }),
            cfg,
        })
    }

    pub fn path(&self) -> &str {
        &self.cfg.path
    }

    pub fn is_framed(&self) -> bool {
        self.cfg.mode == Mode::Framed
    }

    /// Channel authorization: the route's patterns (empty = any) and the credential's grants.
    pub fn may(&self, publish: bool, grants: &crate::auth::Grants, channel: &str) -> bool {
        use switchyard_protocol::pattern_matches as channel_matches;
        let (route, granted) = if publish {
            (&self.cfg.channels.publish, &grants.publish)
        } else {
            (&self.cfg.channels.subscribe, &grants.subscribe)
        };
        (route.is_empty() || route.iter().any(|p| channel_matches(p, channel)))
            && granted
                .as_ref()
                .is_none_or(|g| g.iter().any(|p| channel_matches(p, channel)))
    }
}

/// State shared by every session of one edge node.
pub struct EdgeState {
    pub cfg: EdgeConfig,
    pub bus: Arc<dyn Bus>,
    pub routes: HashMap<String, Arc<Route>>,
    pub sessions: DashMap<String, Arc<Session>>,
    pub channels: ChannelHub,
    /// This node's delivery subject (also the `sy-reply` of every inbound record).
    pub node_topic: String,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Sockets open on this node, and per client IP (the connection caps).
    pub open: std::sync::atomic::AtomicUsize,
    pub per_ip: DashMap<std::net::IpAddr, usize>,
    /// Sockets per authenticated subject (the per-user cap).
    pub per_user: DashMap<String, usize>,
    /// New connections per client IP (when `connect_rate_per_ip` is set).
    pub ip_rate: Option<DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// Cancelled after the drain grace: every session closes with 1012.
    pub close_all: CancellationToken,
}

/// A running edge node.
pub struct Edge {
    pub state: Arc<EdgeState>,
    pub addr: SocketAddr,
    /// The wss:// certificate, when configured (reload it on SIGHUP).
    pub tls: Option<Arc<crate::tls::TlsReloader>>,
    server: JoinHandle<()>,
    delivery: JoinHandle<()>,
    heartbeat: Option<JoinHandle<()>>,
}

/// Renews the node's lease until aborted, compare-and-set on the last revision. A failed
/// renewal is retried on the next tick; if renewals keep failing for a whole lease, routers end
/// this node's sessions. When the node comes back and finds its lease claimed, its sessions
/// are gone from the registry and their backends were told: it closes them (1012, the client
/// should reconnect) and starts a fresh lease.
async fn renew(
    st: Arc<EdgeState>,
    reg: Arc<dyn switchyard_bus::SessionRegistry>,
    mut last: u64,
    every: std::time::Duration,
) {
    let node = st.cfg.node_id.clone();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match reg.heartbeat(&node, Some(last)).await {
            Ok(rev) => last = rev,
            Err(BusError::LeaseLost(why)) => {
                tracing::error!(%why, sessions = st.sessions.len(), "node lease lost: closing this node's sessions");
                for s in st.sessions.iter() {
                    s.queue
                        .close(switchyard_protocol::close::SERVICE_RESTART, "node lease lost");
                }
                match reg.heartbeat(&node, None).await {
                    Ok(rev) => last = rev,
                    Err(e) => tracing::warn!(error = %e, "could not start a new node lease"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the node lease"),
        }
    }
}

impl Edge {
    /// Subscribes to the node delivery subject, then serves `listener` until `shutdown`.
    pub async fn start(
        cfg: EdgeConfig,
        bus: Arc<dyn Bus>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Edge, BusError> {
        let routes = cfg
            .routes
            .iter()
            .map(|r| Ok((r.path.clone(), Arc::new(Route::new(r.clone(), &cfg)?))))
            .collect::<Result<_, String>>()
            .map_err(BusError::Other)?;
        let node_topic = cfg.naming.node(&cfg.node_id);
        let state = Arc::new(EdgeState {
            channels: ChannelHub::new(bus.clone(), cfg.naming.clone()),
            bus: bus.clone(),
            routes,
            sessions: DashMap::new(),
            node_topic: node_topic.clone(),
            shutdown: shutdown.clone(),
            tracker: TaskTracker::new(),
            open: Default::default(),
            per_ip: DashMap::new(),
            per_user: DashMap::new(),
            ip_rate: std::num::NonZeroU32::new(cfg.connect_rate_per_ip)
                .map(|n| RateLimiter::keyed(Quota::per_second(n).allow_burst(n))),
            close_all: CancellationToken::new(),
            cfg,
        });
        let tls = match &state.cfg.tls {
            Some(files) => {
                let t = crate::tls::TlsReloader::new(files.clone()).map_err(BusError::Other)?;
                tokio::spawn(t.clone().watch(std::time::Duration::from_secs(2), shutdown.clone()));
                Some(t)
            }
            None => None,
        };
        let sub = bus.subscribe(&node_topic, SubscribeOptions::default()).await?;
        let delivery = tokio::spawn(crate::delivery::run(state.clone(), sub));
        let heartbeat = match bus.registry() {
            Some(reg) => {
                // First renewal before the first client: a router never sees a session of a
                // node without a lease.
                let rev = reg.heartbeat(&state.cfg.node_id, None).await?;
                Some(tokio::spawn(renew(state.clone(), reg, rev, state.cfg.lease / 3)))
            }
            None => None,
        };
        let addr = listener.local_addr().map_err(|e| BusError::Other(e.to_string()))?;
        let app = Router::new().fallback(upgrade).with_state(state.clone());
        let server = tokio::spawn(crate::listener::serve(
            listener,
            app,
            state.clone(),
            tls.clone(),
            state.close_all.clone(),
        ));
        if state.ip_rate.is_some() {
            // Forget addresses whose bucket is full again, so the map stays bounded.
            let st = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
                loop {
                    tokio::select! {
                        _ = st.shutdown.cancelled() => return,
                        _ = tick.tick() => if let Some(l) = &st.ip_rate { l.retain_recent() },
                    }
                }
            });
        }
        tracing::info!(%addr, node = %state.cfg.node_id, "edge listening");
        Ok(Edge {
            state,
            addr,
            tls,
            server,
            delivery,
            heartbeat,
        })
    }

    /// Waits for the listener to stop (after `shutdown`); lets sessions run for the drain
    /// grace (or until none is left); closes the rest with 1012; then waits for every session
    /// to finish its close handshake and publish its disconnect, up to the shutdown grace (+1 s).
    pub async fn drained(self) {
        self.state.tracker.close();
        let grace = self.state.cfg.drain_grace;
        if !grace.is_zero() {
            tracing::info!(
                sessions = self.state.sessions.len(),
                ?grace,
                "draining: sessions keep running for the drain grace"
            );
            let _ = tokio::time::timeout(grace, self.state.tracker.wait()).await;
        }
        // During the drain grace the listener still accepts (and answers 503 `draining`), so a
        // client a load balancer still sends here is told rather than reset. Then it closes.
        self.state.close_all.cancel();
        // Each session sees the drain on its next poll; wake them all for it. (One that
        // registers after this loop checks `close_all` on its first poll.)
        for s in self.state.sessions.iter() {
            s.queue.wake();
        }
        let _ = self.server.await;
        let grace = self.state.cfg.shutdown_grace + std::time::Duration::from_secs(1);
        if tokio::time::timeout(grace, self.state.tracker.wait()).await.is_err() {
            tracing::warn!(
                left = self.state.sessions.len(),
                "sessions still open after the shutdown grace"
            );
        }
        self.delivery.abort();
        if let Some(h) = self.heartbeat {
            h.abort();
            // Only a node whose sessions all ended (and published their disconnects) leaves;
            // otherwise the lease lapses and a router ends what is left.
            if !self.state.sessions.is_empty() {
                tracing::warn!(
                    left = self.state.sessions.len(),
                    "not removing the node lease: sessions still open"
                );
            } else if let Some(reg) = self.state.bus.registry() {
                if let Err(e) = reg.leave(&self.state.cfg.node_id).await {
                    tracing::warn!(error = %e, "could not remove the node lease");
                }
            }
        }
    }
}

fn refuse(status: StatusCode, reason: &'static str, body: &'static str) -> Response {
    metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => reason).increment(1);
    (status, body).into_response()
}

/// A refusal before any HTTP is read: status, metric reason, body.
pub type Refused = (StatusCode, &'static str, &'static str);

/// The address a client is counted under: IPv4 (also when IPv4-mapped), or the /64 of an IPv6
/// address (one host usually holds a whole /64).
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Holds one slot of the connection caps from accept until the socket closes (so connections
/// still in their TLS or HTTP handshake count too); released on drop.
pub struct Slot {
    st: Arc<EdgeState>,
    ip: std::net::IpAddr,
    user: Option<String>,
}

/// The connection's slot, handed from the accept loop to the upgrade through the request.
#[derive(Clone)]
pub struct ConnSlot(pub Arc<parking_lot::Mutex<Option<Slot>>>);

impl Slot {
    /// At accept: the per-IP connection rate, then the node and per-IP caps.
    pub fn admit(st: &Arc<EdgeState>, peer: std::net::IpAddr) -> Result<Slot, Refused> {
        use std::sync::atomic::Ordering;
        let ip = client_key(peer);
        if st.ip_rate.as_ref().is_some_and(|l| l.check_key(&ip).is_err()) {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "ip_rate",
                "connecting too fast from this address\n",
            ));
        }
        if st.open.fetch_add(1, Ordering::AcqRel) >= st.cfg.max_connections {
            st.open.fetch_sub(1, Ordering::AcqRel);
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "node_cap",
                "node at its connection cap\n",
            ));
        }
        let mut n = st.per_ip.entry(ip).or_insert(0);
        if *n >= st.cfg.max_connections_per_ip {
            drop(n);
            st.open.fetch_sub(1, Ordering::AcqRel);
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "ip_cap",
                "too many connections from this address\n",
            ));
        }
        *n += 1;
        Ok(Slot {
            st: st.clone(),
            ip,
            user: None,
        })
    }

    /// Also takes a slot of the subject's per-user cap (counted per route: the same `sub` from
    /// another route's issuer or API-key file is another user).
    fn add_user(&mut self, route: &str, subject: &str) -> Result<(), Response> {
        let key = format!("{route}\u{0}{subject}");
        let mut n = self.st.per_user.entry(key.clone()).or_insert(0);
        if *n >= self.st.cfg.max_connections_per_user {
            drop(n);
            self.st.per_user.remove_if(&key, |_, n| *n == 0);
            return Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "user_cap",
                "too many connections for this user\n",
            ));
        }
        *n += 1;
        self.user = Some(key);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.st.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.st.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
        if let Some(u) = &self.user {
            self.st.per_user.remove_if_mut(u, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
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
async fn upgrade(
    State(st): State<Arc<EdgeState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
) -> Response {
    let (mut parts, _body) = req.into_parts();
    let headers = &parts.headers;
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
    let offered_v1 = has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, "switchyard.v1");
    let id = ulid::Ulid::new().to_string();
    let span = tracing::info_span!("session", session = %id, route = %route.cfg.path, trace_id = %trace.trace_id());
    let mut sess = Session::new(id.clone(), route.clone(), trace);
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
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
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
    if offered_v1 {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("switchyard.v1"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-switchyard-session", v);
    }
    resp
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

#[cfg(test)]
mod tests {
    use super::client_key;

    #[test]
    fn clients_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let k = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }
}
