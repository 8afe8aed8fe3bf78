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

/// Attempts an upgrade; Ok(socket) or Err(HTTP status).
async fn attempt(app: &Running, query: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{}/secure{query}", app.client)
        .into_client_request()
        .unwrap();
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
    let cases: Vec<(&str, Vec<(&str, String)>, &str, u16)> = vec![
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_identity_is_stamped_into_every_inbound_record() {
    let k = keys();
    let app = secured(&k, 10_000).await;
    let mut tap = app
        .bus
        .subscribe("sy.in.secure", SubscribeOptions::default())
        .await
        .unwrap();
    let bearer = format!("Bearer {}", rs256(&k, good_claims()));
    let mut ws = attempt(&app, "", &[("origin", ORIGIN), ("authorization", &bearer)])
        .await
        .unwrap();
    next_json(&mut ws).await;
    ws.send(Message::text(r#"{"op":"send","data":1}"#)).await.unwrap();
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
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    assert_eq!(close_code(&mut ws).await, Some(4001));
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
