//! The session task ([`super::run`], whose future is [`super::conn::Conn`]) over an in-memory
//! socket (`tokio::io::duplex`), with tokio's clock paused: every deadline (ping, idle, token
//! expiry, the close wait) is reached by the clock advancing, not by waiting.

use super::{run, Session};
use crate::config::EdgeConfig;
use crate::state::{EdgeState, Route};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchyard_bus::{BusOptions, SubscribeOptions, Subscription};
use switchyard_protocol::{Envelope, Kind, TraceContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One server frame as the client reads it: opcode and payload (server frames are unmasked).
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A client frame: FIN set, masked with a fixed key.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    switchyard_protocol::ws::encode_client_frame(0x80 | opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

async fn read_frame(client: &mut DuplexStream) -> Frame {
    let mut h = [0u8; 2];
    client.read_exact(&mut h).await.expect("a frame header");
    let len = match h[1] & 0x7f {
        126 => client.read_u16().await.unwrap() as usize,
        127 => client.read_u64().await.unwrap() as usize,
        n => n as usize,
    };
    let mut payload = vec![0; len];
    client.read_exact(&mut payload).await.unwrap();
    Frame {
        opcode: h[0] & 0x0f,
        payload,
    }
}

/// A session on one route of the default config, over a duplex socket; a tap on the session
/// feed sees its connect and disconnect.
struct Harness {
    st: Arc<EdgeState>,
    sess: Arc<Session>,
    client: DuplexStream,
    feed: Subscription,
    task: JoinHandle<()>,
}

async fn harness(path: &str, tune: impl FnOnce(&mut EdgeConfig), expires_at: Option<u64>) -> Harness {
    let bus = switchyard_bus::connect("memory://", &BusOptions::default())
        .await
        .unwrap();
    harness_on(bus, path, tune, expires_at).await
}

async fn harness_on(
    bus: Arc<dyn switchyard_bus::Bus>,
    path: &str,
    tune: impl FnOnce(&mut EdgeConfig),
    expires_at: Option<u64>,
) -> Harness {
    let mut cfg = EdgeConfig::new("unit");
    tune(&mut cfg);
    let feed = bus
        .subscribe(&cfg.naming.sessions(), SubscribeOptions::default())
        .await
        .unwrap();
    let routes: HashMap<String, Arc<Route>> = cfg
        .routes
        .iter()
        .map(|r| (r.path.clone(), Arc::new(Route::new(r.clone(), &cfg, None))))
        .collect();
    let route = routes[path].clone();
    let st = Arc::new(EdgeState::new(cfg, routes, bus, CancellationToken::new()));
    let trace = TraceContext {
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        tracestate: None,
    };
    let mut sess = Session::new("01J0000000000000000000UNIT".into(), route, trace);
    sess.expires_at = expires_at;
    let sess = Arc::new(sess);
    let (client, server) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(server);
    let task = tokio::spawn(run(st.clone(), sess.clone(), r, w));
    let mut h = Harness {
        st,
        sess,
        client,
        feed,
        task,
    };
    assert_eq!(h.lifecycle().await.0, Kind::Connect);
    h
}

impl Harness {
    /// The next lifecycle record of the session: its kind and close code.
    async fn lifecycle(&mut self) -> (Kind, Option<u16>) {
        let m = self.feed.recv().await.expect("a session feed record");
        let r = &m.record;
        let e = Envelope::from_record(r.key.as_deref(), &r.headers, r.payload.clone()).unwrap();
        (e.kind, e.code)
    }

    /// Reads until a frame that is not a ping (pings are answered by nobody here).
    async fn next_non_ping(&mut self) -> Frame {
        loop {
            let f = read_frame(&mut self.client).await;
            if f.opcode != 0x9 {
                return f;
            }
        }
    }

    /// The client's socket goes away (the server reads end of stream).
    fn hang_up(&mut self) {
        drop(std::mem::replace(&mut self.client, tokio::io::duplex(1).0));
    }

    async fn ended(self) {
        self.task.await.unwrap();
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(start_paused = true)]
async fn pings_every_ping_interval() {
    let mut h = harness("/ws/echo", |c| c.ping_interval = Duration::from_secs(5), None).await;
    let t0 = tokio::time::Instant::now();
    for n in 1..=3u32 {
        let f = read_frame(&mut h.client).await;
        assert_eq!(f.opcode, 0x9, "ping {n}");
        assert_eq!(
            t0.elapsed().as_secs(),
            5 * u64::from(n),
            "ping {n} after {:?}",
            t0.elapsed()
        );
        // A pong counts as the client being alive.
        h.client.write_all(&client_frame(0xA, b"")).await.unwrap();
    }
    // The client goes away: the connection is lost (1006, never sent on the wire).
    h.hang_up();
    assert_eq!(h.lifecycle().await, (Kind::Disconnect, Some(1006)));
    h.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_1001_after_the_idle_timeout() {
    let mut h = harness(
        "/ws/echo",
        |c| {
            c.ping_interval = Duration::from_secs(20);
            c.idle_timeout = Duration::from_secs(60);
        },
        None,
    )
    .await;
    let t0 = tokio::time::Instant::now();
    let f = h.next_non_ping().await;
    assert_eq!(f.close_code(), Some(1001), "{f:?}");
    assert_eq!(&f.payload[2..], b"idle timeout");
    assert_eq!(t0.elapsed().as_secs(), 60);
    assert_eq!(h.lifecycle().await, (Kind::Disconnect, Some(1001)));
    h.ended().await;
}

#[tokio::test(start_paused = true)]
async fn an_expiring_token_closes_4001_and_nothing_after_it_is_published() {
    let mut h = harness("/ws/echo", |_| {}, Some(now_s() + 30)).await;
    let mut inbound =
        h.st.bus
            .subscribe(&h.sess.route.inbound, SubscribeOptions::default())
            .await
            .unwrap();
    let t0 = tokio::time::Instant::now();
    let f = h.next_non_ping().await;
    assert_eq!(f.close_code(), Some(4001), "{f:?}");
    // The clock of `exp` is the wall clock, rounded to seconds; the timer is tokio's.
    assert!((29..=30).contains(&t0.elapsed().as_secs()), "{:?}", t0.elapsed());
    // The client sends one more frame, then answers the close; the disconnect carries 4001.
    h.client.write_all(&client_frame(0x1, b"late")).await.unwrap();
    h.client
        .write_all(&client_frame(0x8, &4001u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(h.lifecycle().await, (Kind::Disconnect, Some(4001)));
    // On the inbound topic the disconnect comes next: the late frame was not published.
    let m = inbound.recv().await.unwrap();
    assert_eq!(m.record.headers.get("sy-kind"), Some("disconnect"));
    h.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_closes_1012_and_waits_the_shutdown_grace_for_the_answer() {
    let mut h = harness("/ws/echo", |c| c.shutdown_grace = Duration::from_secs(7), None).await;
    h.st.close_all.cancel();
    h.sess.queue.wake();
    let f = h.next_non_ping().await;
    assert_eq!(f.close_code(), Some(1012), "{f:?}");
    // The client never answers: the session ends when the grace has passed, not before.
    let t0 = tokio::time::Instant::now();
    assert_eq!(h.lifecycle().await, (Kind::Disconnect, Some(1012)));
    assert_eq!(t0.elapsed().as_secs(), 7, "{:?}", t0.elapsed());
    h.ended().await;
}

/// A memory bus whose publishes of client frames never get an answer (a broker gone after it
/// stored the record, its acknowledgement lost).
struct Unanswered(Arc<dyn switchyard_bus::Bus>, Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl switchyard_bus::Bus for Unanswered {
    fn scheme(&self) -> &'static str {
        "memory"
    }
    async fn publish(
        &self,
        topic: &str,
        record: switchyard_bus::Record,
    ) -> Result<Option<u64>, switchyard_bus::BusError> {
        if record.headers.get("sy-kind") == Some("frame") {
            self.1.notify_one();
            return std::future::pending().await;
        }
        self.0.publish(topic, record).await
    }
    async fn subscribe(&self, pattern: &str, opts: SubscribeOptions) -> Result<Subscription, switchyard_bus::BusError> {
        self.0.subscribe(pattern, opts).await
    }
    fn is_ready(&self) -> bool {
        true
    }
    async fn flush(&self) -> Result<(), switchyard_bus::BusError> {
        Ok(())
    }
}

/// A drain while a client frame's publish waits for its answer: the client is told 1012 at
/// once, not after the publish (which may take up to `--ack-timeout`).
#[tokio::test(start_paused = true)]
async fn a_drain_closes_1012_while_a_publish_waits_for_the_bus() {
    let inner = switchyard_bus::connect("memory://", &BusOptions::default())
        .await
        .unwrap();
    let published = Arc::new(tokio::sync::Notify::new());
    let mut h = harness_on(Arc::new(Unanswered(inner, published.clone())), "/ws/echo", |_| {}, None).await;
    h.client.write_all(&client_frame(0x1, b"stuck")).await.unwrap();
    // The frame's publish is in flight (it never returns) when the drain begins.
    published.notified().await;
    h.st.close_all.cancel();
    h.sess.queue.wake();
    // (Virtual time: the clock is paused, so this bounds the test, not the gateway.)
    let f = tokio::time::timeout(Duration::from_secs(60), h.next_non_ping())
        .await
        .expect("the drain's close while the publish waits");
    assert_eq!(f.close_code(), Some(1012), "{f:?}");
}

/// A socket whose write side has failed (the peer reset it) while its read side stays open.
struct BrokenWriter;

impl tokio::io::AsyncWrite for BrokenWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_ends_the_session_at_once() {
    // Resume off: the session ends with its socket (with resume on it would wait, parked).
    let mut h = harness("/ws/echo", |c| c.resume_window = Duration::ZERO, None).await;
    // Replace the harness's session by one whose writer fails; the reader stays open (the
    // client says nothing), so only the write failure can end it.
    h.task.abort();
    let (client, server) = tokio::io::duplex(1 << 10);
    let sess = Arc::new(Session::new(
        "01J0000000000000000000FAIL".into(),
        h.sess.route.clone(),
        h.sess.trace.clone(),
    ));
    let task = tokio::spawn(run(h.st.clone(), sess.clone(), server, BrokenWriter));
    assert_eq!(h.lifecycle().await.0, Kind::Connect);
    let t0 = tokio::time::Instant::now();
    sess.deliver(&crate::frame::text(b"to nobody"));
    let (kind, code) = loop {
        let l = h.lifecycle().await;
        if l.0 == Kind::Disconnect {
            break l;
        }
    };
    assert_eq!((kind, code), (Kind::Disconnect, Some(1006)));
    assert_eq!(t0.elapsed(), Duration::ZERO, "no deadline was waited for");
    task.await.unwrap();
    drop(client);
}

#[tokio::test(start_paused = true)]
async fn a_control_frame_flood_closes_1008() {
    let mut h = harness(
        "/ws/echo",
        |c| {
            c.frame_limits.control_per_second = 10;
        },
        None,
    )
    .await;
    let mut pings = Vec::new();
    for _ in 0..50 {
        pings.extend_from_slice(&client_frame(0x9, b"p"));
    }
    h.client.write_all(&pings).await.unwrap();
    // Pongs for the pings within budget, then our close.
    let close = loop {
        let f = read_frame(&mut h.client).await;
        if f.opcode == 0xA {
            continue;
        }
        break f;
    };
    assert_eq!(close.close_code(), Some(1008), "{close:?}");
    assert_eq!(&close.payload[2..], b"control frame flood");
    assert_eq!(h.lifecycle().await, (Kind::Disconnect, Some(1008)));
    h.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_socket_waits_for_the_resume_window_then_ends_with_its_code() {
    let mut h = harness("/ws/echo", |c| c.resume_window = Duration::from_secs(30), None).await;
    let t0 = tokio::time::Instant::now();
    h.hang_up();
    // Parked: still in the node's sessions, no disconnect yet.
    assert!(h.sess.cont.wait_parked(Duration::from_secs(1)).await);
    assert!(h.st.sessions.contains_key(&h.sess.id));
    assert_eq!(h.lifecycle().await, (Kind::Disconnect, Some(1006)));
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(30),
        "the disconnect waited exactly the window"
    );
    assert!(!h.st.sessions.contains_key(&h.sess.id));
    h.ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_close_the_server_started_is_final_even_with_resume_on() {
    let mut h = harness("/ws/echo", |c| c.resume_window = Duration::from_secs(30), None).await;
    let t0 = tokio::time::Instant::now();
    // A backend closes the session; the client then vanishes without answering.
    h.sess.queue.close(4000, "bye");
    h.hang_up();
    assert_eq!(h.lifecycle().await.0, Kind::Disconnect);
    assert_eq!(t0.elapsed(), Duration::ZERO, "not parked");
    h.ended().await;
}
