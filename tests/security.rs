//! Hostile clients against a secured route, over real sockets. Each case asserts the exact
//! status or close code, then that 100 healthy clients on the same node are unaffected.

mod common;

use common::*;
use futures::SinkExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::path::PathBuf;
use switchyard::config::Settings;
use switchyard_bus::SubscribeOptions;
use switchyard_protocol::Envelope;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ORIGIN: &str = "https://app.example";

struct Keys {
    private: Vec<u8>,
    public_path: PathBuf,
    public: Vec<u8>,
}

fn keys() -> Keys {
    let dir = std::env::temp_dir().join(unique("keys"));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("key.pem");
    let public = dir.join("pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .status()
        .unwrap()
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl makes an RSA key pair");
    Keys {
        private: std::fs::read(&private).unwrap(),
        public: std::fs::read(&public).unwrap(),
        public_path: public,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rs256(k: &Keys, claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&k.private).unwrap(),
    )
    .unwrap()
}

fn good_claims() -> serde_json::Value {
    json!({"sub": "alice", "aud": "sy", "iss": "test", "exp": now() + 600, "tenant": "t1",
           "channels": ["ticker.>", "room.*"], "publish": ["room.lobby"]})
}

fn b64(v: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// The secured routes: `/secure` (rate limit → close 1008) and `/secure-soft` (rate limit →
/// error op), both RS256 with channel grants from the `channels` / `publish` claims.
fn secured_routes(keys: &Keys) -> Vec<switchyard_edge::RouteConfig> {
    let route = |path: &str, action: &str| {
        format!(
            r#"
[[route]]
path = "{path}"
topic = "secure"
mode = "framed"
allow_publish = true
queue_size = 64
slow_policy = "close"
max_message_size = 4096
allowed_origins = ["{ORIGIN}"]
[route.auth]
algorithms = ["RS256"]
key_file = "{key}"
audience = "sy"
issuer = "test"
stamp_claims = ["tenant"]
subscribe_claim = "channels"
publish_claim = "publish"
[route.rate_limit]
messages_per_second = 50
burst = 100
action = "{action}"
[route.channels]
subscribe = ["ticker.>", "news.*", "room.*"]
publish = ["room.*"]
"#,
            key = keys.public_path.display()
        )
    };
    let text = route("/secure", "close") + &route("/secure-soft", "error");
    switchyard_edge::config::parse_routes(&text).expect("test routes parse")
}

async fn secured_with(keys: &Keys, tweak: impl FnOnce(&mut Settings)) -> Running {
    let mut s = Settings::for_tests();
    s.edge.routes.extend(secured_routes(keys));
    tweak(&mut s);
    s.edge.validate().expect("test settings validate");
    start(s).await
}

async fn secured(keys: &Keys, per_ip: usize) -> Running {
    secured_with(keys, |s| s.edge.max_connections_per_ip = per_ip).await
}

/// Attempts an upgrade on `/secure`; Ok(socket) or Err(HTTP status).
async fn attempt(app: &Running, query: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    attempt_path(app, &format!("/secure{query}"), headers).await
}

/// Attempts an upgrade on any path; Ok(socket) or Err(HTTP status).
async fn attempt_path(app: &Running, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{}{path}", app.client).into_client_request().unwrap();
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("unexpected handshake error {e}"),
    }
}

async fn healthy(app: &Running, k: &Keys, n: usize) -> Vec<Ws> {
    let bearer = format!("Bearer {}", rs256(k, good_claims()));
    let mut v = Vec::new();
    for _ in 0..n {
        let mut ws = attempt(app, "", &[("origin", ORIGIN), ("authorization", &bearer)])
            .await
            .expect("healthy client");
        assert_eq!(next_json(&mut ws).await["op"], "welcome");
        v.push(ws);
    }
    v
}

/// Every healthy client still gets an ack for a send.
async fn still_healthy(clients: &mut [Ws], round: u64) {
    for ws in clients.iter_mut() {
        ws.send(Message::text(json!({"op":"send","data":round,"id":round}).to_string()))
            .await
            .unwrap();
    }
    for ws in clients.iter_mut() {
        assert_eq!(
            next_json(ws).await,
            json!({"op":"ack","id":round}),
            "healthy client unaffected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_are_refused_and_healthy_clients_unaffected() {
    let k = keys();
    let app = secured(&k, 10_000).await;
    let mut ok = healthy(&app, &k, 100).await;
    let good = rs256(&k, good_claims());
    let bearer = format!("Bearer {good}");
    let mut round = 0;
    // (what, request headers, path, expected status)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str, u16);
    let cases: Vec<Case> = vec![
        (
            "foreign origin, valid token",
            vec![
                ("origin", "https://evil.example".into()),
                ("authorization", bearer.clone()),
            ],
            "",
            403,
        ),
        (
            "suffix trick",
            vec![
                ("origin", "https://app.example.evil.com".into()),
                ("authorization", bearer.clone()),
            ],
            "",
            403,
        ),
        (
            "prefix trick",
            vec![
                ("origin", "https://evil.app.example".into()),
                ("authorization", bearer.clone()),
            ],
            "",
            403,
        ),
        (
            "null origin",
            vec![("origin", "null".into()), ("authorization", bearer.clone())],
            "",
            403,
        ),
        ("no origin", vec![("authorization", bearer.clone())], "", 403),
        ("no token", vec![("origin", ORIGIN.into())], "", 401),
        (
            "garbage token",
            vec![("origin", ORIGIN.into()), ("authorization", "Bearer not.a.jwt".into())],
            "",
            401,
        ),
        (
            "alg none",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!(
                        "Bearer {}.{}.",
                        b64(&json!({"alg":"none","typ":"JWT"})),
                        b64(&good_claims())
                    ),
                ),
            ],
            "",
            401,
        ),
        (
            "HS256 signed with the RSA public key (key confusion)",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!(
                        "Bearer {}",
                        encode(
                            &Header::new(Algorithm::HS256),
                            &good_claims(),
                            &EncodingKey::from_secret(&k.public)
                        )
                        .unwrap()
                    ),
                ),
            ],
            "",
            401,
        ),
        (
            "expired",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!(
                        "Bearer {}",
                        rs256(&k, json!({"sub":"a","aud":"sy","iss":"test","exp": now() - 10}))
                    ),
                ),
            ],
            "",
            401,
        ),
        (
            "not yet valid",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!(
                        "Bearer {}",
                        rs256(
                            &k,
                            json!({"sub":"a","aud":"sy","iss":"test","exp": now() + 600, "nbf": now() + 300})
                        )
                    ),
                ),
            ],
            "",
            401,
        ),
        (
            "wrong audience",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!(
                        "Bearer {}",
                        rs256(&k, json!({"sub":"a","aud":"other","iss":"test","exp": now() + 600}))
                    ),
                ),
            ],
            "",
            401,
        ),
        (
            "wrong issuer",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!(
                        "Bearer {}",
                        rs256(&k, json!({"sub":"a","aud":"sy","iss":"mallory","exp": now() + 600}))
                    ),
                ),
            ],
            "",
            401,
        ),
        (
            "no exp",
            vec![
                ("origin", ORIGIN.into()),
                (
                    "authorization",
                    format!("Bearer {}", rs256(&k, json!({"sub":"a","aud":"sy","iss":"test"}))),
                ),
            ],
            "",
            401,
        ),
    ];
    for (name, headers, query, status) in cases {
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(attempt(&app, query, &hdrs).await.err(), Some(status), "{name}");
        round += 1;
        still_healthy(&mut ok, round).await;
    }
    // The token also works from the query and from a Sec-WebSocket-Protocol entry.
    let mut q = attempt(&app, &format!("?access_token={good}"), &[("origin", ORIGIN)])
        .await
        .expect("query token");
    assert_eq!(next_json(&mut q).await["op"], "welcome");
    let proto = format!("switchyard.v1, bearer.{good}");
    let mut p = attempt(&app, "", &[("origin", ORIGIN), ("sec-websocket-protocol", &proto)])
        .await
        .expect("protocol token");
    assert_eq!(next_json(&mut p).await["op"], "welcome");
    // Oversized (1009) and invalid UTF-8 (1007) do not disturb the others either.
    p.send(Message::text("x".repeat(5000))).await.unwrap();
    assert_eq!(close_code(&mut p).await, Some(1009));
    round += 1;
    still_healthy(&mut ok, round).await;
    app.stop().await;
}

/// Taps `/secure`'s inbound topic, connects alice, waits for the welcome and sends `frame`.
async fn tapped_send(app: &Running, k: &Keys, frame: &str) -> (switchyard_bus::Subscription, Ws) {
    let tap = app
        .bus
        .subscribe("sy.in.secure", SubscribeOptions::default())
        .await
        .unwrap();
    let bearer = format!("Bearer {}", rs256(k, good_claims()));
    let mut ws = attempt(app, "", &[("origin", ORIGIN), ("authorization", &bearer)])
        .await
        .unwrap();
    next_json(&mut ws).await;
    ws.send(Message::text(frame.to_owned())).await.unwrap();
    (tap, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_identity_is_stamped_into_every_inbound_record() {
    let k = keys();
    let app = secured(&k, 10_000).await;
    let (mut tap, _ws) = tapped_send(&app, &k, r#"{"op":"send","data":1}"#).await;
    for kind in ["connect", "frame"] {
        let m = tokio::time::timeout(WAIT, tap.recv()).await.unwrap().unwrap();
        let e = Envelope::from_record(m.record.key.as_deref(), &m.record.headers, m.record.payload.clone()).unwrap();
        assert_eq!(e.kind.as_str(), kind);
        let id = e.identity.expect("identity stamped");
        assert_eq!(id.subject, "alice");
        assert_eq!(id.claims.get("tenant"), Some(&json!("t1")), "configured claims only");
        assert!(!id.claims.contains_key("aud"));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_connection_closes_4001() {
    let k = keys();
    let app = secured(&k, 10_000).await;
    let short = rs256(&k, json!({"sub":"bob","aud":"sy","iss":"test","exp": now() + 2}));
    let mut ws = attempt(
        &app,
        "",
        &[("origin", ORIGIN), ("authorization", &format!("Bearer {short}"))],
    )
    .await
    .unwrap();
    // A fractional `exp` (accepted by the validator) expires too.
    let fractional = rs256(
        &k,
        json!({"sub":"carol","aud":"sy","iss":"test","exp": (now() + 2) as f64 + 0.4}),
    );
    let mut ws2 = attempt(
        &app,
        "",
        &[("origin", ORIGIN), ("authorization", &format!("Bearer {fractional}"))],
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    assert_eq!(next_json(&mut ws2).await["op"], "welcome");
    assert_eq!(close_code(&mut ws).await, Some(4001));
    assert_eq!(close_code(&mut ws2).await, Some(4001), "fractional exp");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_past_the_clocks_range_does_not_kill_its_session() {
    let k = keys();
    let app = secured(&k, 10_000).await;
    // Signed by the issuer, so valid; 10^19 s is more than a monotonic deadline can hold.
    let far = rs256(
        &k,
        json!({"sub":"dave","aud":"sy","iss":"test","exp": 10_000_000_000_000_000_000u64}),
    );
    let mut ws = attempt(
        &app,
        "",
        &[("origin", ORIGIN), ("authorization", &format!("Bearer {far}"))],
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    ws.send(Message::text(r#"{"op":"send","data":1,"id":"m1"}"#))
        .await
        .unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("m1")),
        "{ack}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ip_opening_ten_times_its_cap_gets_429_past_the_cap() {
    let k = keys();
    const CAP: usize = 120;
    let app = secured(&k, CAP).await;
    // 100 healthy clients hold slots of this IP too: the hostile burst gets the remaining 20.
    let mut ok = healthy(&app, &k, 100).await;
    let bearer = format!("Bearer {}", rs256(&k, good_claims()));
    let (mut opened, mut refused) = (Vec::new(), 0);
    for _ in 0..CAP * 10 {
        match attempt(&app, "", &[("origin", ORIGIN), ("authorization", &bearer)]).await {
            Ok(ws) => opened.push(ws),
            Err(429) => refused += 1,
            Err(s) => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(opened.len(), CAP - 100, "exactly up to the cap");
    assert_eq!(refused, CAP * 10 - (CAP - 100));
    still_healthy(&mut ok, 1).await;
    // Closing frees slots.
    drop(opened);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if attempt(&app, "", &[("origin", ORIGIN), ("authorization", &bearer)])
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots are released when sockets close"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hostile frames, headers and connection patterns, over raw sockets.
// ---------------------------------------------------------------------------------------------

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client frame as the wire carries it (masked, as clients must).
fn client_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    switchyard_protocol::ws::encode_client_frame(if fin { 0x80 } else { 0 } | op, payload, [0x11, 0x22, 0x33, 0x44])
}

/// Writes a handshake by hand and returns the socket after the 101 (or the status).
async fn raw_upgrade(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<TcpStream, u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let status = read_status(&mut s).await.expect("a response");
    if status == 101 {
        Ok(s)
    } else {
        Err(status)
    }
}

/// Reads a response head byte by byte (so nothing after it is consumed); its status, or None
/// when the server closed without answering.
async fn read_status(s: &mut TcpStream) -> Option<u16> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("response in time")
        {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ').nth(1).and_then(|c| c.parse().ok())
}

/// Reads server frames until a close frame: its code. None when the socket ends without one.
async fn raw_close_code<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout_at(deadline, r.read_exact(&mut h))
            .await
            .expect("close in time")
            .ok()?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut e = [0u8; 2];
                r.read_exact(&mut e).await.ok()?;
                u16::from_be_bytes(e) as usize
            }
            127 => {
                let mut e = [0u8; 8];
                r.read_exact(&mut e).await.ok()?;
                u64::from_be_bytes(e) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await.ok()?;
        if h[0] & 0x0f == 8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
    }
}

/// Sends `wire` on its own task (the server may stop reading) and returns the close code seen.
async fn send_raw_and_close_code(s: TcpStream, wire: Vec<u8>) -> Option<u16> {
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&wire).await;
        wr
    });
    let code = raw_close_code(&mut rd).await;
    writer.abort();
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_and_headers_get_exact_codes_and_healthy_clients_unaffected() {
    let k = keys();
    let app = secured_with(&k, |s| s.edge.handshake_timeout = std::time::Duration::from_secs(1)).await;
    let mut ok = healthy(&app, &k, 100).await;
    let bearer = format!("Bearer {}", rs256(&k, good_claims()));
    let auth = [("Origin", ORIGIN), ("Authorization", bearer.as_str())];
    let mut round = 100;

    let big = vec![b'x'; 5000];
    let mut fragmented = client_frame(false, 1, &big[..3000]);
    fragmented.extend(client_frame(true, 0, &big[..3000]));
    let mut continuations = client_frame(false, 1, b"x");
    for _ in 0..100_000 {
        continuations.extend(client_frame(false, 0, b""));
    }
    let pings: Vec<u8> = (0..1000).flat_map(|_| client_frame(true, 9, b"")).collect();
    let flood: Vec<u8> = (0..500)
        .flat_map(|_| client_frame(true, 1, br#"{"op":"send","data":1}"#))
        .collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("oversized frame", client_frame(true, 1, &big), 1009),
        ("fragmented message over the limit", fragmented, 1009),
        ("10^5 empty continuation frames", continuations, 1008),
        ("ping flood", pings, 1008),
        ("messages past the session rate (action close)", flood, 1008),
        ("invalid UTF-8", client_frame(true, 1, &[0xff, 0xfe, 0xfd]), 1007),
    ];
    for (name, wire, want) in cases {
        let s = raw_upgrade(app.client, "/secure", &auth).await.expect(name);
        assert_eq!(send_raw_and_close_code(s, wire).await, Some(want), "{name}");
        round += 1;
        still_healthy(&mut ok, round).await;
    }

    // Past the rate with action "error": each refused message is answered with its id.
    let mut soft = attempt_path(&app, "/secure-soft", &[("origin", ORIGIN), ("authorization", &bearer)])
        .await
        .expect("soft route");
    assert_eq!(next_json(&mut soft).await["op"], "welcome");
    let (mut acked, mut limited) = (0, 0);
    // In batches of 50: the route's queue (64, 2x for replies) bounds unread replies too.
    for batch in 0..6 {
        let ids = batch * 50..(batch + 1) * 50;
        for i in ids.clone() {
            soft.send(Message::text(json!({"op":"send","data":i,"id":i}).to_string()))
                .await
                .unwrap();
        }
        for i in ids {
            let r = next_json(&mut soft).await;
            assert_eq!(r["id"], i, "answers in order, each with its id");
            match r["op"].as_str() {
                Some("ack") => acked += 1,
                Some("error") if r["code"] == "rate_limited" => limited += 1,
                _ => panic!("unexpected reply {r}"),
            }
        }
    }
    assert!(
        acked >= 100 && limited >= 1,
        "burst 100 acked ({acked}), the rest refused ({limited})"
    );
    soft.send(Message::text(r#"{"op":"send","data":0}"#)).await.unwrap();
    round += 1;
    still_healthy(&mut ok, round).await;

    // Header floods: 431 before anything is parsed further.
    let huge = "a".repeat(64 << 10);
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("x-h{i}"), "1".to_string())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (name, headers, want) in [
        ("64 KiB header", vec![("x-big", huge.as_str())], 431),
        ("200 headers", many, 431),
    ] {
        assert_eq!(
            raw_upgrade(app.client, "/secure", &headers).await.err(),
            Some(want),
            "{name}"
        );
        round += 1;
        still_healthy(&mut ok, round).await;
    }

    // Slowloris on headers: half a request, then silence. The server hangs up after the
    // handshake timeout (1 s here) without a response.
    let mut slow = TcpStream::connect(app.client).await.unwrap();
    slow.write_all(b"GET /secure HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(read_status(&mut slow).await, None, "closed without a response");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "not before the timeout"
    );
    round += 1;
    still_healthy(&mut ok, round).await;

    let body = reqwest::get(app.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"switchyard_drops_total{route="/secure",reason="frame_flood"}"#,
        r#"switchyard_drops_total{route="/secure",reason="control_flood"}"#,
        r#"switchyard_rate_limited_total{route="/secure",action="close"}"#,
        r#"switchyard_rate_limited_total{route="/secure-soft",action="error"}"#,
        r#"switchyard_handshakes_rejected_total{reason="headers_too_large"}"#,
        r#"switchyard_handshakes_rejected_total{reason="header_timeout"}"#,
    ] {
        assert!(body.contains(series), "{series} counted:\n{body}");
    }
    app.stop().await;
}

/// A TCP connection from a chosen loopback source address.
async fn tcp_from(src: &str, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{src}:0").parse().unwrap())?;
    sock.connect(to).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_rules_connection_rate_and_per_user_caps() {
    let k = keys();
    let app = secured_with(&k, |s| {
        s.edge.deny_cidrs = vec!["127.0.0.2/32".parse().unwrap()];
        s.edge.connect_rate_per_ip = 3;
    })
    .await;
    // Denied address: the connection is closed at accept, before any HTTP.
    let mut denied = tcp_from("127.0.0.2", app.client).await.unwrap();
    denied.write_all(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n\r\n").await.ok();
    assert_eq!(read_status(&mut denied).await, None, "denied CIDR gets no response");

    // Connection rate per IP: 3 per second, burst 3, from 127.0.0.3.
    let started = std::time::Instant::now();
    let (mut opened, mut limited) = (Vec::new(), 0);
    for _ in 0..20 {
        let mut s = tcp_from("127.0.0.3", app.client).await.unwrap();
        s.write_all(
            b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        match read_status(&mut s).await {
            Some(101) => opened.push(s),
            Some(429) => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let refill = (started.elapsed().as_secs_f64() * 3.0).floor() as usize;
    assert!(
        opened.len() >= 3 && opened.len() <= 3 + refill,
        "burst of 3 plus {refill} refilled: {} opened",
        opened.len()
    );
    assert_eq!(opened.len() + limited, 20);

    let body = reqwest::get(app.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["ip_denied", "ip_rate"] {
        assert!(
            body.contains(&format!(r#"switchyard_handshakes_rejected_total{{reason="{reason}"}}"#)),
            "{reason} counted"
        );
    }
    drop(opened);
    app.stop().await;

    // Per-user cap: alice may hold 3 sockets; bob is not affected.
    let app = secured_with(&k, |s| s.edge.max_connections_per_user = 3).await;
    let alice = format!("Bearer {}", rs256(&k, good_claims()));
    let mut bob_claims = good_claims();
    bob_claims["sub"] = json!("bob");
    let bob = format!("Bearer {}", rs256(&k, bob_claims));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            attempt(&app, "", &[("origin", ORIGIN), ("authorization", &alice)])
                .await
                .expect("within cap"),
        );
    }
    assert_eq!(
        attempt(&app, "", &[("origin", ORIGIN), ("authorization", &alice)])
            .await
            .err(),
        Some(429),
        "alice's 4th socket"
    );
    let mut b = attempt(&app, "", &[("origin", ORIGIN), ("authorization", &bob)])
        .await
        .expect("bob unaffected");
    assert_eq!(next_json(&mut b).await["op"], "welcome");
    let body = reqwest::get(app.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let reason = "user_cap";
    assert!(
        body.contains(&format!(r#"switchyard_handshakes_rejected_total{{reason="{reason}"}}"#)),
        "{reason} counted"
    );
    drop(held);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_permissions_come_from_the_route_and_the_token() {
    let k = keys();
    let app = secured(&k, 10_000).await;
    let bearer = format!("Bearer {}", rs256(&k, good_claims()));
    let mut ws = attempt(&app, "", &[("origin", ORIGIN), ("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    let mut ask = async |op: serde_json::Value| {
        ws.send(Message::text(op.to_string())).await.unwrap();
        next_json(&mut ws).await
    };
    // Token: channels ["ticker.>", "room.*"], publish ["room.lobby"].
    // Route: subscribe ["ticker.>", "news.*", "room.*"], publish ["room.*"].
    let r = ask(json!({"op":"subscribe","channel":"ticker.btc.usd"})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let r = ask(json!({"op":"subscribe","channel":"news.today"})).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "route allows, token does not: {r}"
    );
    let r = ask(json!({"op":"subscribe","channel":"secret.plans"})).await;
    assert_eq!(r["code"], "forbidden", "token would not, route does not: {r}");
    let r = ask(json!({"op":"publish","channel":"room.lobby","data":"hi","id":"p1"})).await;
    assert_eq!(r, json!({"op":"ack","id":"p1"}));
    let r = ask(json!({"op":"publish","channel":"room.other","data":"hi","id":"p2"})).await;
    assert_eq!(
        (r["code"].as_str(), r["id"].as_str()),
        (Some("forbidden"), Some("p2")),
        "subscribe grant is not a publish grant: {r}"
    );
    let r = ask(json!({"op":"publish","channel":"ticker.btc","data":"x","id":"p3"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");

    // A token without the claims gets no channel at all on this route.
    let bare = format!(
        "Bearer {}",
        rs256(&k, json!({"sub":"carol","aud":"sy","iss":"test","exp": now() + 600}))
    );
    let mut c = attempt(&app, "", &[("origin", ORIGIN), ("authorization", &bare)])
        .await
        .unwrap();
    assert_eq!(next_json(&mut c).await["op"], "welcome");
    c.send(Message::text(
        json!({"op":"subscribe","channel":"ticker.btc"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut c).await["code"], "forbidden");
    let n = sample(
        &app.admin.to_string(),
        r#"switchyard_forbidden_total{route="/secure",op="subscribe"}"#,
    )
    .await;
    assert_eq!(n, 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_records_carry_a_verifiable_edge_signature() {
    let k = keys();
    let key = b"0123456789abcdef0123456789abcdef-edge".to_vec();
    let app = secured_with(&k, |s| {
        s.edge.identity_hmac_key = Some(std::sync::Arc::new(key.clone()))
    })
    .await;
    let (mut tap, _ws) = tapped_send(&app, &k, r#"{"op":"send","data":"payload"}"#).await;
    for kind in ["connect", "frame"] {
        let m = tokio::time::timeout(WAIT, tap.recv()).await.unwrap().unwrap();
        let r = &m.record;
        assert_eq!(r.headers.get("sy-kind"), Some(kind));
        assert!(
            switchyard_protocol::sign::verify(&key, &r.headers, &r.payload),
            "{kind} verifies"
        );
        assert!(!switchyard_protocol::sign::verify(
            b"another key of at least 32 bytes!!",
            &r.headers,
            &r.payload
        ));
        let mut tampered = r.headers.clone();
        tampered.0.iter_mut().find(|(k, _)| k == "sy-sub").unwrap().1 = "mallory".into();
        assert!(
            !switchyard_protocol::sign::verify(&key, &tampered, &r.payload),
            "a changed identity fails"
        );
        if kind == "frame" {
            assert!(
                !switchyard_protocol::sign::verify(&key, &r.headers, b"\"other\""),
                "a changed payload fails"
            );
        }
        // The Python verifier from the docs agrees, both ways.
        for (headers, want) in [(&r.headers, true), (&tampered, false)] {
            use base64::Engine;
            let input = json!({
                "key_hex": key.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                "headers": headers.0,
                "payload_b64": base64::engine::general_purpose::STANDARD.encode(&r.payload),
            });
            let mut py = std::process::Command::new("python3")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/sy_sig.py"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("python3");
            use std::io::Write;
            py.stdin
                .take()
                .unwrap()
                .write_all(input.to_string().as_bytes())
                .unwrap();
            let out = py.wait_with_output().unwrap();
            assert_eq!(
                out.status.success(),
                want,
                "python verify: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_chosen_by_kid() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let k = keys();
    let enc = EncodingKey::from_rsa_pem(&k.private).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let dir = std::env::temp_dir().join(unique("jwks"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap()).unwrap();
    let text = format!(
        "[[route]]\npath = \"/jwks\"\ntopic = \"jwks\"\nmode = \"framed\"\n[route.auth]\nalgorithms = [\"RS256\"]\njwks_file = \"{}\"\n",
        path.display()
    );
    let app = secured_with(&k, |s| {
        s.edge
            .routes
            .extend(switchyard_edge::config::parse_routes(&text).unwrap())
    })
    .await;
    let token = |kid: Option<&str>| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(str::to_owned);
        format!("Bearer {}", encode(&h, &good_claims(), &enc).unwrap())
    };
    let mut ok = attempt_path(&app, "/jwks", &[("authorization", &token(Some("k1")))])
        .await
        .expect("kid k1");
    assert_eq!(next_json(&mut ok).await["op"], "welcome");
    assert_eq!(
        attempt_path(&app, "/jwks", &[("authorization", &token(Some("k2")))])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        attempt_path(&app, "/jwks", &[("authorization", &token(None))])
            .await
            .err(),
        Some(401)
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// wss:// — certificate reload and TLS slowloris.
// ---------------------------------------------------------------------------------------------

/// A wss:// echo connection; returns the socket and the certificate the server presented.
async fn wss(
    pki: &Pki,
    addr: std::net::SocketAddr,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    Vec<u8>,
) {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone().into()).unwrap();
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake with the test CA");
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{}/ws/echo", addr.port()), tls)
        .await
        .expect("WebSocket over TLS");
    (ws, presented)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_reloads_its_certificate_and_times_out_silent_tls_handshakes() {
    let pki = pki();
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let first = leaf(&pki, &cert, &key);
    let mut s = Settings::for_tests();
    s.edge.tls = Some(switchyard_edge::tls::TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
    });
    s.edge.handshake_timeout = std::time::Duration::from_secs(1);
    let app = start(s).await;

    let (mut ws, presented) = wss(&pki, app.client).await;
    assert_eq!(presented, first);
    ws.send(Message::text("over tls")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut ws))
        .await
        .unwrap();
    assert_eq!(echoed.unwrap().unwrap(), Message::text("over tls"));

    // Plain ws:// to the TLS port is not served.
    assert!(tokio_tungstenite::connect_async(app.url("/ws/echo")).await.is_err());

    // TLS slowloris: connect and say nothing. Closed after the handshake timeout.
    let mut silent = TcpStream::connect(app.client).await.unwrap();
    let started = std::time::Instant::now();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(WAIT, silent.read(&mut b))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "hung up: {n:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));

    // New files: new connections get the new certificate (polled), the open socket stays up.
    let second = leaf(&pki, &cert, &key);
    assert_ne!(first, second);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, now) = wss(&pki, app.client).await;
        if now == second {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "certificate reloaded in time");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    ws.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut ws))
        .await
        .unwrap();
    assert_eq!(echoed.unwrap().unwrap(), Message::text("still here"));

    // A broken key file is refused and the current certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    let series = r#"switchyard_tls_reloads_total{result="error"}"#;
    let deadline = std::time::Instant::now() + WAIT;
    while sample(&app.admin.to_string(), series).await == 0 {
        assert!(std::time::Instant::now() < deadline, "failed reload counted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(wss(&pki, app.client).await.1, second);
    assert!(
        sample(
            &app.admin.to_string(),
            r#"switchyard_handshakes_rejected_total{reason="tls_timeout"}"#
        )
        .await
            >= 1
    );
    app.stop().await;
}
