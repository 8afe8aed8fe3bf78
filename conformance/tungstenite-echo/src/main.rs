//! Minimal tokio-tungstenite 0.29 echo server, equivalent to tokio-tungstenite's
//! `examples/autobahn-server.rs`: accept with the default config, echo every text and binary
//! message, let tungstenite answer pings and closes. Used only to check that kosoku
//! reproduces tokio-tungstenite's published Autobahn baseline (see docs/autobahn.md).
//!
//! Usage: tungstenite-echo [ADDR]   (default 127.0.0.1:9002; loopback only)

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{accept_async, tungstenite::Error};

async fn accept_connection(stream: TcpStream) {
    if let Err(e) = handle_connection(stream).await {
        match e {
            Error::ConnectionClosed | Error::Protocol(_) | Error::Utf8(_) => (),
            err => eprintln!("error processing connection: {err}"),
        }
    }
}

async fn handle_connection(stream: TcpStream) -> tokio_tungstenite::tungstenite::Result<()> {
    let mut ws = accept_async(stream).await?;
    while let Some(msg) = ws.next().await {
        let msg = msg?;
        if msg.is_text() || msg.is_binary() {
            ws.send(msg).await?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9002".to_string());
    let listener = TcpListener::bind(&addr).await.expect("can't listen");
    eprintln!("tungstenite-echo listening on {}", listener.local_addr().unwrap());
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(accept_connection(stream));
    }
}
