//! The client accept loop: CIDR allow/deny at accept, optional TLS (with a handshake timeout),
//! then HTTP/1.1 with a header-read timeout and header size and count limits (slowloris, header
//! floods). Requests go to the axum router, which performs the WebSocket upgrade.

use crate::metrics as m;
use crate::server::EdgeState;
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !st.cfg.ip_allowed(peer.ip()) {
            ip_denied.increment(1);
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let st = st.clone();
        let tls = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            match tls {
                None => serve_http(TokioIo::new(tcp), peer, app, &st).await,
                Some(acceptor) => {
                    let hs = tokio::time::timeout(st.cfg.handshake_timeout, acceptor.accept(tcp)).await;
                    match hs {
                        Ok(Ok(tls)) => serve_http(TokioIo::new(tls), peer, app, &st).await,
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

async fn serve_http<I>(io: TokioIo<I>, peer: SocketAddr, app: axum::Router, st: &EdgeState)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
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
