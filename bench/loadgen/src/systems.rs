//! The four target systems, as seen from a client: how to connect a socket from a chosen source
//! address, how to become a live subscriber, how to read benchmark stamps out of what arrives,
//! how to send a unicast probe, and how to publish.
//!
//! | system | subscriber | publisher (the cheaper path of each) |
//! |---|---|---|
//! | `switchyard` | framed `/ws`: `subscribe` → wait for `subscribed` | one framed `/ws` connection sending `publish` ops (a WebSocket frame per message: cheaper than one admin-API HTTP request per message) |
//! | `baseline` | same framed subset | same |
//! | `nats` | NATS over WebSocket: `CONNECT`, `SUB`, `PING` → wait for `PONG` | one core-NATS TCP connection, pipelined `PUB`s |
//! | `pushpin` | the GRIP backend subscribes the socket on `OPEN` and sends `{"op":"subscribed"}` | Pushpin's HTTP publish endpoint, one POST per batch of due messages |

use crate::nats;
use crate::payload::{self, Stamp};
use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use futures::stream::{SplitSink, StreamExt};
use futures::SinkExt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum System {
    Switchyard,
    Nats,
    Pushpin,
    Baseline,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Switchyard => "switchyard",
            System::Nats => "nats",
            System::Pushpin => "pushpin",
            System::Baseline => "baseline",
        }
    }
}

/// `host:port` of a `ws://` or `http://` URL; only loopback targets are accepted.
pub(crate) fn target_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{url}: expected SCHEME://HOST:PORT/..."))?;
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{url}: host must be an IP literal with a port"))?;
    check_loopback(addr.ip())?;
    Ok(addr)
}

/// Load is only ever sent to 127.0.0.0/8 (or ::1).
pub(crate) fn check_loopback(ip: IpAddr) -> Result<()> {
    if !ip.is_loopback() {
        bail!("{ip} is not a loopback address: refusing to send load there");
    }
    Ok(())
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// The publisher's connection: TCP connect from `src` (port chosen by the kernel) and a
/// tokio-tungstenite upgrade.
async fn open_publisher(url: &str, dst: SocketAddr, src: IpAddr) -> Result<Ws> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("bind {src}"))?;
    let tcp = sock.connect(dst).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config()))
        .await
        .context("upgrade")?;
    Ok(ws)
}

/// The subscribers' and the `handshake` scenario's upgrade: TCP connect from `src`, then an
/// RFC 6455 upgrade written by hand (one fixed request; the response read up to its blank line;
/// status 101, `Upgrade`, `Connection` and `Sec-WebSocket-Accept` checked). tungstenite's client
/// handshake builds an `http::Request`, parses with `httparse` and allocates an 8 KiB read buffer
/// per socket; this does the same checks for a fraction of the load generator's CPU, so it is
/// less of a ceiling on upgrades/s (the same client for every system). Returns the socket and
/// any bytes that arrived after the response head (a server may speak first).
pub(crate) async fn upgrade_raw(
    url: &str,
    dst: SocketAddr,
    src: IpAddr,
    rcvbuf: Option<u32>,
) -> Result<(TcpStream, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let sock = TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("bind {src}"))?;
    let mut tcp = sock.connect(dst).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], &rest[i..]), // "?query": path "/" is implied by HTTP; keep it
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    let key = generate_key();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.context("send upgrade request")?;
    let mut buf = [0u8; 2048];
    let mut have = 0;
    let end = loop {
        let n = tcp.read(&mut buf[have..]).await.context("read upgrade response")?;
        if n == 0 {
            bail!("connection closed during the upgrade");
        }
        have += n;
        if let Some(i) = memchr::memmem::find(&buf[..have], b"\r\n\r\n") {
            break i;
        }
        if have == buf.len() {
            bail!("upgrade response headers over {} bytes", buf.len());
        }
    };
    let head = std::str::from_utf8(&buf[..end]).context("upgrade response is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {status}");
    }
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    // RFC 6455 §4.1: Upgrade is "websocket", Connection has "Upgrade", the accept key matches.
    if !get("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        bail!("upgrade response without Upgrade: websocket");
    }
    if !get("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))) {
        bail!("upgrade response without Connection: Upgrade");
    }
    let want = derive_accept_key(key.as_bytes());
    let accept = get("sec-websocket-accept");
    if accept != Some(want.as_str()) {
        bail!("bad Sec-WebSocket-Accept: {accept:?}");
    }
    Ok((tcp, buf[end + 4..have].to_vec()))
}

/// One client connection of a system.
pub(crate) struct Conn {
    pub ws: crate::ws::Ws,
    system: System,
    nats: nats::Parser,
    /// Framed `{"op":"ack"}` and `{"op":"error"}` answers seen by [`Conn::read`] (counted only
    /// when `count_ops` is set).
    pub acks: u64,
    pub op_errors: u64,
    pub count_ops: bool,
}

/// What one read produced.
pub(crate) enum Read {
    /// Frames were processed (zero or more stamps were reported).
    Frame,
    /// The connection ended (close frame, EOF or error).
    Closed,
}

impl Conn {
    pub(crate) fn new(ws: crate::ws::Ws, system: System) -> Self {
        Self {
            ws,
            system,
            nats: nats::Parser::default(),
            acks: 0,
            op_errors: 0,
            count_ops: false,
        }
    }

    /// Makes this connection a live subscriber of `channel`. Returns once a message published
    /// after this point is guaranteed (Switchyard, NATS) or expected (Pushpin: see the warm-up
    /// barrier in the scenarios) to reach it.
    pub(crate) async fn subscribe(&mut self, channel: &str) -> Result<()> {
        match self.system {
            System::Switchyard | System::Baseline => {
                let op = format!(r#"{{"op":"subscribe","channel":"{channel}"}}"#);
                self.ws.send_text(op.as_bytes()).await?;
                self.wait_text(br#""op":"subscribed""#).await
            }
            System::Nats => {
                let cmd = format!("{}SUB {channel} 1\r\nPING\r\n", nats::CONNECT);
                self.ws.send_binary(cmd.as_bytes()).await?;
                self.wait_pong().await
            }
            System::Pushpin => self.wait_text(br#""op":"subscribed""#).await,
        }
    }

    /// Prepares a unicast session: NATS subscribes to the session's own subject `u.<id>`.
    pub(crate) async fn prepare_unicast(&mut self, id: usize) -> Result<()> {
        if self.system == System::Nats {
            let cmd = format!("{}SUB u.{id} 1\r\nPING\r\n", nats::CONNECT);
            self.ws.send_binary(cmd.as_bytes()).await?;
            self.wait_pong().await?;
        }
        Ok(())
    }

    /// Sends one unicast probe that the system routes back to this session; with `framed_id`,
    /// as a framed `send` op carrying that `id`.
    pub(crate) async fn send_unicast(&mut self, id: usize, payload: Vec<u8>, framed_id: Option<u64>) -> Result<()> {
        if let Some(k) = framed_id {
            let mut op = Vec::with_capacity(payload.len() + 40);
            op.extend_from_slice(format!(r#"{{"op":"send","id":{k},"data":"#).as_bytes());
            op.extend_from_slice(&payload);
            op.push(b'}');
            return self.ws.send_text(&op).await;
        }
        match self.system {
            System::Nats => {
                let mut v = Vec::with_capacity(payload.len() + 32);
                nats::push_pub(&mut v, &format!("u.{id}"), &payload);
                self.ws.send_binary(&v).await
            }
            _ => self.ws.send_text(&payload).await,
        }
    }

    async fn wait_text(&mut self, needle: &[u8]) -> Result<()> {
        loop {
            let (mut found, mut refused) = (false, None);
            let got = self
                .ws
                .read(|f| {
                    let b = match f {
                        crate::ws::Frame::Text(b) => b,
                        crate::ws::Frame::Binary(_) => return,
                    };
                    if memchr::memmem::find(b, needle).is_some() {
                        found = true;
                    } else if memchr::memmem::find(b, br#""op":"error""#).is_some() {
                        refused = Some(String::from_utf8_lossy(b).into_owned());
                    }
                })
                .await;
            if let Some(e) = refused {
                bail!("server refused: {e}");
            }
            if found {
                return Ok(());
            }
            if let crate::ws::Got::Closed = got {
                bail!("connection ended while subscribing");
            }
        }
    }

    async fn wait_pong(&mut self) -> Result<()> {
        loop {
            let (mut pong, mut ping, mut err) = (false, false, None);
            let nats = &mut self.nats;
            let got = self
                .ws
                .read(|f| {
                    let (crate::ws::Frame::Text(b) | crate::ws::Frame::Binary(b)) = f;
                    nats.feed(b, |e| match e {
                        nats::Event::Pong => pong = true,
                        nats::Event::Ping => ping = true,
                        nats::Event::Err(l) => err = Some(String::from_utf8_lossy(l).into_owned()),
                        _ => {}
                    });
                })
                .await;
            if ping {
                self.ws.send_binary(b"PONG\r\n").await?;
            }
            if let Some(e) = err {
                bail!("nats: {e}");
            }
            if pong {
                return Ok(());
            }
            if let crate::ws::Got::Closed = got {
                bail!("connection ended while subscribing");
            }
        }
    }

    /// Reads once and reports every benchmark stamp in the frames that arrived to `on`.
    pub(crate) async fn read(&mut self, mut on: impl FnMut(Stamp)) -> Read {
        let (system, nats) = (self.system, &mut self.nats);
        let mut ping = false;
        let (count_ops, acks, op_errors) = (self.count_ops, &mut self.acks, &mut self.op_errors);
        let got = self
            .ws
            .read(|f| {
                let (crate::ws::Frame::Text(b) | crate::ws::Frame::Binary(b)) = f;
                if count_ops && b.starts_with(br#"{"op":"#) {
                    if memchr::memmem::find(b, br#""op":"ack""#).is_some() {
                        *acks += 1;
                    } else if memchr::memmem::find(b, br#""op":"error""#).is_some() {
                        *op_errors += 1;
                    }
                    return;
                }
                if system == System::Nats {
                    nats.feed(b, |e| match e {
                        nats::Event::Msg(p) => {
                            if let Some(s) = payload::parse(p) {
                                on(s)
                            }
                        }
                        nats::Event::Ping => ping = true,
                        _ => {}
                    });
                } else if let Some(s) = payload::parse(b) {
                    on(s);
                }
            })
            .await;
        if ping && self.ws.send_binary(b"PONG\r\n").await.is_err() {
            return Read::Closed;
        }
        match got {
            crate::ws::Got::Frames => Read::Frame,
            crate::ws::Got::Closed => Read::Closed,
        }
    }
}

/// The publishing side of a system.
pub(crate) enum Publisher {
    /// A framed `/ws` connection sending `publish` ops (Switchyard, baseline).
    Framed {
        sink: SplitSink<Ws, Message>,
        channel: String,
        _reader: JoinHandle<()>,
    },
    /// A core NATS TCP connection.
    Nats {
        writer: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
        subject: String,
        buf: Vec<u8>,
        _reader: JoinHandle<()>,
    },
    /// Pushpin's HTTP publish endpoint.
    Pushpin {
        client: reqwest::Client,
        url: String,
        channel: String,
    },
}

impl Publisher {
    /// Connects to `endpoint`: a `ws://` URL (framed systems), `host:port` (NATS core TCP) or the
    /// `http://…/publish/` URL (Pushpin). `errors` counts refusals the server reports back.
    pub(crate) async fn connect(system: System, endpoint: &str, channel: &str, errors: Arc<AtomicU64>) -> Result<Self> {
        match system {
            System::Switchyard | System::Baseline => {
                let dst = target_addr(endpoint)?;
                let ws = open_publisher(endpoint, dst, dst.ip()).await?;
                let (sink, mut stream) = ws.split();
                let reader = tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        let Message::Text(t) = m else { continue };
                        if memchr::memmem::find(t.as_bytes(), br#""op":"error""#).is_some()
                            && errors.fetch_add(1, Ordering::Relaxed) < 3
                        {
                            eprintln!("loadgen: publisher got {}", t.as_str());
                        }
                    }
                });
                Ok(Publisher::Framed {
                    sink,
                    channel: channel.to_owned(),
                    _reader: reader,
                })
            }
            System::Nats => {
                let addr: SocketAddr = endpoint
                    .trim_start_matches("nats://")
                    .parse()
                    .with_context(|| format!("nats publish address {endpoint}"))?;
                check_loopback(addr.ip())?;
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (r, mut w) = tcp.into_split();
                w.write_all(format!("{}PING\r\n", nats::CONNECT).as_bytes()).await?;
                let mut lines = BufReader::new(r);
                // INFO, then PONG once CONNECT was accepted.
                let mut line = String::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        bail!("nats closed the publisher connection");
                    }
                    if line.starts_with("-ERR") {
                        bail!("nats: {}", line.trim());
                    }
                    if line.starts_with("PONG") {
                        break;
                    }
                }
                let writer = Arc::new(tokio::sync::Mutex::new(w));
                let w2 = writer.clone();
                let reader = tokio::spawn(async move {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match lines.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line.starts_with("PING") {
                            let _ = w2.lock().await.write_all(b"PONG\r\n").await;
                        } else if line.starts_with("-ERR") {
                            errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("loadgen: nats publisher got {}", line.trim());
                        }
                    }
                });
                Ok(Publisher::Nats {
                    writer,
                    subject: channel.to_owned(),
                    buf: Vec::new(),
                    _reader: reader,
                })
            }
            System::Pushpin => {
                target_addr(endpoint)?;
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(4)
                    .timeout(Duration::from_secs(30))
                    .build()?;
                Ok(Publisher::Pushpin {
                    client,
                    url: endpoint.to_owned(),
                    channel: channel.to_owned(),
                })
            }
        }
    }

    /// Publishes `payloads` in order (one message each).
    pub(crate) async fn publish(&mut self, payloads: &[Vec<u8>]) -> Result<()> {
        match self {
            Publisher::Framed { sink, channel, .. } => {
                for p in payloads {
                    let mut op = String::with_capacity(p.len() + channel.len() + 40);
                    op.push_str(r#"{"op":"publish","channel":""#);
                    op.push_str(channel);
                    op.push_str(r#"","data":"#);
                    op.push_str(std::str::from_utf8(p)?);
                    op.push('}');
                    sink.feed(Message::text(op)).await?;
                }
                sink.flush().await?;
            }
            Publisher::Nats {
                writer, subject, buf, ..
            } => {
                buf.clear();
                for p in payloads {
                    nats::push_pub(buf, subject, p);
                }
                writer.lock().await.write_all(buf).await?;
            }
            Publisher::Pushpin { client, url, channel } => {
                let items: Vec<serde_json::Value> = payloads
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "channel": channel,
                            "formats": {"ws-message": {"content": String::from_utf8_lossy(p)}},
                        })
                    })
                    .collect();
                let body = serde_json::to_vec(&serde_json::json!({ "items": items }))?;
                let resp = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    bail!(
                        "pushpin publish: {} {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    );
                }
            }
        }
        Ok(())
    }
}
