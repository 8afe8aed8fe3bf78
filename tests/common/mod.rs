//! Test helpers: the real app on 127.0.0.1:0, real WebSocket clients over real sockets, and the
//! real `switchyard` binary as a child process.
#![allow(dead_code, unreachable_pub)]

use futures::{SinkExt, StreamExt};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use std::time::Instant;
use switchyard::config::Settings;
use switchyard::App;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Generous bound for anything a test waits on; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn raise_fd_limit() {
    let _ = rlimit::increase_nofile_limit(20_000);
}

/// Builds and starts an app; the returned handle runs it in the background.
pub struct Running {
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub bus: std::sync::Arc<dyn switchyard_bus::Bus>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub edge: std::sync::Arc<switchyard_edge::EdgeState>,
    pub task: tokio::task::JoinHandle<Result<(), switchyard::ShutdownIncomplete>>,
}

pub async fn start(settings: Settings) -> Running {
    raise_fd_limit();
    let app: App = settings.build().await.expect("app builds");
    let client = app.client_addr.expect("edge runs");
    let admin = app.admin_addr;
    let bus = app.bus.clone();
    let shutdown = app.shutdown_token();
    let edge = app.edge.as_ref().expect("edge runs").state.clone();
    let task = tokio::spawn(app.run());
    Running {
        client,
        admin,
        bus,
        shutdown,
        edge,
        task,
    }
}

pub async fn start_default() -> Running {
    start(Settings::for_tests()).await
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.client, path)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("app stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Connects and returns the socket plus its session id (from `x-switchyard-session`).
pub async fn connect(url: &str) -> (Ws, String) {
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade");
    let id = resp
        .headers()
        .get("x-switchyard-session")
        .expect("session header")
        .to_str()
        .unwrap()
        .to_owned();
    (ws, id)
}

/// Next data message (text or binary), skipping pings/pongs; panics on close or timeout.
pub async fn next_data(ws: &mut Ws) -> Message {
    // One deadline for the whole wait: server pings must not extend it.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("message in time");
        match m {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    match next_data(ws).await {
        Message::Text(t) => serde_json::from_str(&t).expect("json"),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the close frame and returns its code (None = connection ended without one),
/// then keeps polling so the client's close reply is sent and the handshake completes.
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let code = loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    };
    while let Ok(Some(_)) = tokio::time::timeout(WAIT, ws.next()).await {}
    code
}

/// Connects to a framed route, checks the welcome, subscribes, waits for `subscribed`.
pub async fn framed_subscriber(url: &str, channel: &str) -> (Ws, String) {
    let (mut ws, id) = connect(url).await;
    let w = next_json(&mut ws).await;
    assert_eq!(w["op"], "welcome");
    assert_eq!(w["session"], id.as_str());
    ws.send(Message::text(format!(r#"{{"op":"subscribe","channel":"{channel}"}}"#)))
        .await
        .unwrap();
    let s = next_json(&mut ws).await;
    assert_eq!(s, serde_json::json!({"op":"subscribed","channel":channel}));
    (ws, id)
}

pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// A normal close with code 1000.
pub async fn close_normal(ws: &mut Ws) {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
}

/// A unique name for per-test routes, topics and channels.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Sends `sig` (`-TERM`, `-9`, `-STOP`, ...) to process `pid`, which must exist.
pub fn send_signal(pid: &str, sig: &str) {
    assert!(std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success());
}

/// A bus client of the test's own on `url`, under `prefix` (to publish or read as a backend).
pub async fn bus_for(url: &str, prefix: &str) -> std::sync::Arc<dyn switchyard_bus::Bus> {
    let opts = switchyard_bus::BusOptions {
        prefix: prefix.to_owned(),
        ..Default::default()
    };
    switchyard_bus::connect(url, &opts).await.unwrap()
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `scripts/kafka ARGS` (the test command's broker script) with `env` and returns its
/// stdout.
pub fn kafka_script(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run scripts/kafka");
    assert!(
        out.status.success(),
        "scripts/kafka {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Path of the built `switchyard` binary (cargo builds it for integration tests).
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_switchyard")
}

type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Runs the binary until it prints its "switchyard started" line; returns the child, the
/// client/admin addresses it bound and the rest of its log.
async fn start_binary(args: &[&str]) -> (tokio::process::Child, Option<SocketAddr>, SocketAddr, LogLines) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(binary())
        .args(args)
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchyard");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(WAIT, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = match serde_json::from_str(&l) {
                Ok(v) => v,
                Err(_) => panic!("non-JSON log line: {l}"),
            };
            if v["fields"]["message"] == "switchyard started" {
                return v;
            }
        }
        panic!("switchyard exited before starting");
    })
    .await
    .expect("switchyard starts in time");
    let client = started["fields"]["client"].as_str().and_then(|s| s.parse().ok());
    let admin = started["fields"]["admin"].as_str().unwrap().parse().unwrap();
    (child, client, admin, lines)
}

/// [`start_binary`], with the rest of the log collected until the process ends.
pub async fn spawn_binary(
    args: &[&str],
) -> (
    tokio::process::Child,
    Option<SocketAddr>,
    SocketAddr,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let (child, client, admin, mut lines) = start_binary(args).await;
    let rest = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    (child, client, admin, rest)
}

/// A switchyard process started by a test. If the test fails, the end of its log is printed
/// with the failure (at the level in SWITCHYARD_LOG, which the process inherits: info unless
/// set, so warnings and errors; `SWITCHYARD_LOG=debug ./scripts/test FILTER` shows more).
pub struct Proc {
    pub child: tokio::process::Child,
    pub client: Option<SocketAddr>,
    pub admin: SocketAddr,
    role: String,
    log: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

/// Log lines kept per process for a failing test's report.
const LOG_TAIL: usize = 40;

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "--- last {} log lines of `switchyard {}` (pid {:?}) ---",
                log.len(),
                self.role,
                self.child.id()
            );
            for l in log.iter() {
                eprintln!("{l}");
            }
        }
    }
}

impl Proc {
    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{}", self.client.expect("an edge"), path)
    }
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    /// The last log lines the process wrote (stderr), oldest first.
    pub fn log_tail(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
    /// Sends SIGTERM (a graceful shutdown).
    pub fn term(&self) {
        send_signal(&self.child.id().expect("running").to_string(), "-TERM");
    }
    pub fn kill9(&mut self) {
        send_signal(&self.child.id().expect("running").to_string(), "-9");
    }
}

/// Runs `switchyard ARGS --listen 127.0.0.1:0 --admin 127.0.0.1:0` expecting it to refuse to
/// start with wrong broker credentials: exit 69 and exactly one stderr line, equal to `want`,
/// with none of `secrets` in it. Returns how long the refusal took.
pub async fn refused_start(args: &[&str], env: &[(&str, &str)], want: &str, secrets: &[&str]) -> Duration {
    let mut c = tokio::process::Command::new(binary());
    c.args(args)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("SWITCHYARD_LOG_FORMAT")
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let started = Instant::now();
    let out = tokio::time::timeout(WAIT, c.output())
        .await
        .expect("a refused start exits")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(69), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "exactly one line: {err}");
    assert_eq!(err.trim_end(), want);
    for s in secrets {
        assert!(!err.contains(s), "secret {s:?} in stderr: {err}");
    }
    started.elapsed()
}

/// Starts `switchyard ROLE --bus BUS --prefix PREFIX` on ephemeral loopback ports.
pub async fn spawn(role: &str, bus: &str, prefix: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        role,
        "--bus",
        bus,
        "--prefix",
        prefix,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (child, client, admin, mut lines) = start_binary(&args).await;
    let log = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let tail = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            let mut t = tail.lock().unwrap();
            if t.len() == LOG_TAIL {
                t.pop_front();
            }
            t.push_back(l);
        }
    });
    Proc {
        child,
        client,
        admin,
        role: role.to_owned(),
        log,
    }
}

/// Sends framed `send` ops with ids until `until` and returns (acked, told) id sets. Every
/// op must be answered (ack or error): an unanswered op would be a silent loss.
pub async fn sender(url: String, until: Instant) -> (String, BTreeSet<u64>, BTreeSet<u64>) {
    let (mut ws, id) = connect(&url).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    let (mut acked, mut told) = (BTreeSet::new(), BTreeSet::new());
    let mut i = 0u64;
    while Instant::now() < until {
        ws.send(Message::text(
            serde_json::json!({"op":"send","data":i,"id":i}).to_string(),
        ))
        .await
        .unwrap();
        loop {
            let v = next_json(&mut ws).await;
            if v["id"] != serde_json::json!(i) {
                continue; // e.g. a backend message; there is no backend in this test
            }
            match v["op"].as_str() {
                Some("ack") => acked.insert(i),
                Some("error") => told.insert(i),
                _ => panic!("unexpected {v}"),
            };
            break;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(2)).await; // pacing, not synchronisation
    }
    (id, acked, told)
}

/// After an outage: checks each session's frames as the log holds them (in log order) against
/// what its client was told, and returns (acked, refused-and-told, told-but-stored) totals.
/// Fails on a lost acknowledged frame, a duplicate, a reordering, or a stored frame nobody
/// answered.
pub fn account(
    results: &[(String, BTreeSet<u64>, BTreeSet<u64>)],
    stored: &mut std::collections::HashMap<String, Vec<u64>>,
) -> (usize, usize, usize) {
    let (mut acked_n, mut told_n, mut told_but_stored) = (0, 0, 0);
    for (session, acked, told) in results {
        let got = stored.remove(session).unwrap_or_default();
        let got_set: BTreeSet<u64> = got.iter().copied().collect();
        assert_eq!(got.len(), got_set.len(), "no duplicates for {session}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "stored in order for {session}");
        let lost: Vec<_> = acked.difference(&got_set).collect();
        assert!(lost.is_empty(), "acknowledged frames lost for {session}: {lost:?}");
        let unexplained: Vec<_> = got_set
            .iter()
            .filter(|i| !acked.contains(i) && !told.contains(i))
            .collect();
        assert!(unexplained.is_empty(), "stored frames nobody answered: {unexplained:?}");
        acked_n += acked.len();
        told_n += told.len();
        told_but_stored += got_set.intersection(told).count();
    }
    (acked_n, told_n, told_but_stored)
}

/// The `/metrics` text of the admin listener at `admin`.
pub async fn metrics_text(admin: &str) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one Prometheus sample, given its name and labels exactly as rendered.
pub async fn sample(admin: &str, series: &str) -> u64 {
    let text = metrics_text(admin).await;
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Starts one of the Python example backends and waits for its "ready" line.
pub async fn spawn_python(script: &str, args: &[&str]) -> tokio::process::Child {
    let mut py = tokio::process::Command::new("python3")
        .arg(format!("{}/examples/python/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut out = tokio::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line))
        .await
        .unwrap()
        .unwrap();
    assert!(line.contains("ready"), "{script} started: {line}");
    py
}

/// Sends `n` frames tagged with the session id, then expects exactly those back, in order
/// (an echo route): each session gets its own replies and no one else's.
pub async fn echo_in_order(ws: &mut Ws, id: &str, n: usize) {
    for i in 0..n {
        ws.send(Message::text(format!("{id}:{i}"))).await.unwrap();
    }
    for i in 0..n {
        assert_eq!(
            next_data(ws).await,
            Message::text(format!("{id}:{i}")),
            "session {id}: frame {i}"
        );
    }
}

/// A throwaway CA for TLS tests.
pub struct Pki {
    pub ca_der: Vec<u8>,
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

pub fn pki() -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "switchyard test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&key).unwrap();
    Pki {
        ca_der: ca.der().to_vec(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// Writes a fresh leaf for localhost / 127.0.0.1 to `cert` and `key`; returns its DER.
pub fn leaf(pki: &Pki, cert: &std::path::Path, key: &std::path::Path) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let k = rcgen::KeyPair::generate().unwrap();
    let c = params.signed_by(&k, &pki.issuer).unwrap();
    std::fs::write(key, k.serialize_pem()).unwrap();
    std::fs::write(cert, c.pem()).unwrap();
    c.der().to_vec()
}

/// Writes the CA certificate as PEM.
pub fn write_ca(pki: &Pki, path: &std::path::Path) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&pki.ca_der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    std::fs::write(
        path,
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        ),
    )
    .unwrap();
}

/// Sends framed `send` ops (data = id) until `until`, reading acks and the demo backend's
/// replies (`{"echo": id}`) as they come; then waits for the reply of every acknowledged send
/// (up to `WAIT` after the last). Returns (session, acked ids, replies in arrival order).
pub async fn send_and_collect_replies(url: String, until: Instant) -> Collected {
    let (mut ws, id) = connect(&url).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    let (mut acked, mut replies) = (BTreeSet::new(), Vec::new());
    let note = |v: serde_json::Value, acked: &mut BTreeSet<u64>, replies: &mut Vec<u64>| match (
        v["op"].as_str(),
        v["echo"].as_u64(),
    ) {
        (Some("ack"), _) => {
            acked.insert(v["id"].as_u64().unwrap());
        }
        (None, Some(n)) => replies.push(n),
        _ => panic!("unexpected {v}"),
    };
    let mut i = 0u64;
    while Instant::now() < until {
        ws.send(Message::text(
            serde_json::json!({"op":"send","data":i,"id":i}).to_string(),
        ))
        .await
        .unwrap();
        // The ack of this send (replies to earlier ones may come first).
        while !acked.contains(&i) {
            note(next_json(&mut ws).await, &mut acked, &mut replies);
        }
        i += 1;
    }
    let missing = |acked: &BTreeSet<u64>, replies: &Vec<u64>| acked.iter().any(|a| !replies.contains(a));
    while missing(&acked, &replies) {
        note(next_json(&mut ws).await, &mut acked, &mut replies);
    }
    (id, acked, replies)
}

/// What [`send_and_collect_replies`] returns: (session, acknowledged ids, replies in order).
pub type Collected = (String, BTreeSet<u64>, Vec<u64>);

/// Awaits clients of [`send_and_collect_replies`] and checks that every acknowledged send was
/// answered: (acknowledged sends, duplicate replies).
pub async fn every_acked_send_answered(clients: Vec<tokio::task::JoinHandle<Collected>>) -> (usize, usize) {
    let (mut acked_n, mut dups) = (0, 0);
    for c in clients {
        let (session, acked, replies) = c.await.unwrap();
        let distinct: BTreeSet<u64> = replies.iter().copied().collect();
        let lost: Vec<_> = acked.difference(&distinct).collect();
        assert!(
            lost.is_empty(),
            "{session}: acknowledged sends without a reply: {lost:?}"
        );
        acked_n += acked.len();
        dups += replies.len() - distinct.len();
    }
    (acked_n, dups)
}
