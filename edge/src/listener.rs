//! The client accept loop: CIDR allow/deny, connection rate and connection caps at accept
//! (refused plain connections get a bare 429/503), optional TLS (within the handshake timeout),
//! then HTTP/1.1 with a header-read timeout and header size and count limits (slowloris, header
//! floods). Requests go to the axum router, which performs the WebSocket upgrade.

use crate::admit::{ConnSlot, Slot};
use crate::metrics as m;
use crate::state::EdgeState;
use crate::tls::TlsReloader;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// After a failed accept (EMFILE and friends), how long to wait before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a refused connection's request is read (and dropped) after the response, so the
/// client sees the response rather than a reset.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);

/// Accepts until `stop`; each connection is served on its own task.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    st: Arc<EdgeState>,
    tls: Option<Arc<TlsReloader>>,
    stop: CancellationToken,
) {
    let ip_denied = metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => "ip_denied");
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if !st.cfg.ip_allowed(peer.ip()) {
            ip_denied.increment(1);
            drop(tcp);
            continue;
        }
        // Connection rate and caps are charged here, before TLS or HTTP costs anything.
        let slot = match Slot::admit(&st, peer.ip()) {
            Ok(s) => ConnSlot(Arc::new(parking_lot::Mutex::new(Some(s)))),
            Err((status, reason, body)) => {
                metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => reason).increment(1);
                if tls.is_none() {
                    tokio::spawn(refuse_raw(tcp, status, body));
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let st = st.clone();
        let tls = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            match tls {
                None => serve_http(TokioIo::new(tcp), peer, app, &st, slot).await,
                Some(acceptor) => {
                    let hs = tokio::time::timeout(st.cfg.handshake_timeout, acceptor.accept(tcp)).await;
                    match hs {
                        Ok(Ok(tls)) => serve_http(TokioIo::new(tls), peer, app, &st, slot).await,
                        Ok(Err(e)) => {
                            metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => "tls").increment(1);
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => "tls_timeout").increment(1);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
}

/// Answers a refused plain-text connection with a minimal HTTP response, then closes it
/// gracefully (a short linger reading what the client sent, so it gets the status, not a reset).
async fn refuse_raw(mut tcp: tokio::net::TcpStream, status: axum::http::StatusCode, body: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if tcp.write_all(head.as_bytes()).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn serve_http<I>(io: TokioIo<I>, peer: SocketAddr, app: axum::Router, st: &EdgeState, slot: ConnSlot)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(slot.clone());
        app.clone().oneshot(req)
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(st.cfg.handshake_timeout)
        .max_buf_size(st.cfg.max_header_bytes)
        .max_headers(st.cfg.max_headers);
    if let Err(e) = http.serve_connection(io, svc).with_upgrades().await {
        let reason = if e.is_timeout() {
            "header_timeout"
        } else if e.is_parse_too_large() {
            "headers_too_large"
        } else if e.is_parse() {
            "bad_request"
        } else {
            return tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        };
        metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => reason).increment(1);
        tracing::debug!(%peer, reason, "handshake refused");
    }
}
