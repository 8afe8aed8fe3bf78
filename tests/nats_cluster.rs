//! Switchyard as a distributed system on a real nats-server: edges, routers and backends as
//! separate processes. `scripts/test` starts nats-server with JetStream and exports NATS_URL,
//! NATS_MONITOR_URL and NATS_SERVER_BIN; every test uses its own subject prefix.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run ./scripts/test, which starts nats-server"))
}

fn prefix() -> String {
    unique("t")
}

/// The headers of the next record of `kind` for `session` on `sub` (other records are skipped).
async fn next_of(sub: &mut async_nats::Subscriber, kind: &str, session: &str) -> async_nats::HeaderMap {
    loop {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("a {kind} record for {session}"))
            .unwrap();
        let h = m.headers.unwrap();
        let is = |name: &str, want: &str| h.get(name).map(|v| v.as_str()) == Some(want);
        if is("sy-kind", kind) && is("sy-session", session) {
            return h;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sessions_over_two_edges_and_two_routers_get_their_own_replies_in_order() {
    raise_fd_limit();
    let (url, p) = (env("NATS_URL"), prefix());
    let edges = [spawn("edge", &url, &p, &[]).await, spawn("edge", &url, &p, &[]).await];
    let _routers = [
        spawn("router", &url, &p, &[]).await,
        spawn("router", &url, &p, &[]).await,
    ];
    let _demo = spawn("demo", &url, &p, &[]).await;

    // Raw echo: the backend answers on sy-reply, straight to the node, in order.
    let mut tasks = Vec::new();
    for c in 0..1000 {
        let url = edges[c % 2].ws("/ws/echo");
        tasks.push(tokio::spawn(async move {
            let (mut ws, id) = connect(&url).await;
            echo_in_order(&mut ws, &id, 5).await;
            close_normal(&mut ws).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // Framed `send`: the backend answers on the outbound subject; a router forwards it.
    let mut tasks = Vec::new();
    for c in 0..200 {
        let url = edges[c % 2].ws("/ws");
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = connect(&url).await;
            assert_eq!(next_json(&mut ws).await["op"], "welcome");
            for i in 0..3 {
                ws.send(Message::text(json!({"op":"send","data":[c, i],"id":i}).to_string()))
                    .await
                    .unwrap();
            }
            let (mut acks, mut replies) = (BTreeSet::new(), BTreeSet::new());
            while acks.len() + replies.len() < 6 {
                let v = next_json(&mut ws).await;
                if v["op"] == "ack" {
                    acks.insert(v["id"].as_u64().unwrap());
                } else {
                    let e = v["echo"].as_array().unwrap_or_else(|| panic!("unexpected {v}"));
                    assert_eq!(e[0], c, "only its own replies");
                    replies.insert(e[1].as_u64().unwrap());
                }
            }
            assert_eq!(acks, BTreeSet::from([0, 1, 2]));
            assert_eq!(replies, BTreeSet::from([0, 1, 2]));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_fans_out_on_both_edges_with_one_nats_subscription_per_edge() {
    let (url, p) = (env("NATS_URL"), prefix());
    let nodes = [unique("ea"), unique("eb")];
    let edges = [
        spawn("edge", &url, &p, &["--node-id", &nodes[0]]).await,
        spawn("edge", &url, &p, &["--node-id", &nodes[1]]).await,
    ];
    let channel = unique("ch");
    let mut subs = Vec::new();
    for i in 0..40 {
        subs.push(framed_subscriber(&edges[i % 2].ws("/ws"), &channel).await.0);
    }
    let conns: Value = reqwest::get(format!("{}/connz?subs=detail&limit=4096", env("NATS_MONITOR_URL")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subject = format!("{p}.ch.{channel}");
    for node in &nodes {
        let name = format!("switchyard-{node}");
        let conn = conns["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name.as_str());
        let conn = conn.unwrap_or_else(|| panic!("connection {name} in connz"));
        let n = conn["subscriptions_list_detail"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["subject"] == subject.as_str())
            .count();
        assert_eq!(
            n, 1,
            "{name}: exactly one NATS subscription for the channel with 20 local subscribers"
        );
    }
    let http = reqwest::Client::new();
    for n in 0..10 {
        let r = http
            .post(edges[0].admin("/api/publish"))
            .json(&json!({"channel": channel, "data": {"n": n}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    for mut ws in subs {
        for n in 0..10 {
            assert_eq!(next_json(&mut ws).await["data"], json!({"n": n}));
        }
    }
}

/// The routers end a killed edge's sessions once its lease lapsed and then the resume window
/// passed (a session could have resumed elsewhere from the log meanwhile), each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_edge_sessions_expire_with_synthetic_disconnects_after_the_lease_and_the_window() {
    let (url, p) = (env("NATS_URL"), prefix());
    const LEASE: Duration = Duration::from_secs(3);
    const WINDOW: Duration = Duration::from_secs(2);
    let (lease, window) = ("3s", "2s");
    let mut doomed = spawn("edge", &url, &p, &["--lease", lease, "--resume-window", window]).await;
    let routers = [
        spawn("router", &url, &p, &["--lease", lease, "--resume-window", window]).await,
        spawn("router", &url, &p, &["--lease", lease, "--resume-window", window]).await,
    ];
    // A backend with the stock client, listening for lifecycle events.
    let nc = async_nats::connect(&url).await.unwrap();
    let mut inbound = nc.subscribe(format!("{p}.in.echo.*")).await.unwrap();
    nc.flush().await.unwrap();
    let mut sessions = BTreeSet::new();
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let (ws, id) = connect(&doomed.ws("/ws/echo")).await;
        sessions.insert(id);
        sockets.push(ws);
    }
    // Every connect has reached the backend before the edge dies.
    let mut connected = BTreeSet::new();
    while connected.len() < 20 {
        let m = tokio::time::timeout(WAIT, inbound.next()).await.unwrap().unwrap();
        let h = m.headers.unwrap();
        if h.get("sy-kind").unwrap().as_str() == "connect" {
            connected.insert(h.get("sy-session").unwrap().to_string());
        }
    }
    assert_eq!(connected, sessions);
    doomed.kill9();
    let killed = Instant::now();
    let mut ended = BTreeSet::new();
    while ended.len() < 20 {
        let m = tokio::time::timeout(WAIT, inbound.next())
            .await
            .expect("synthetic disconnects arrive")
            .unwrap();
        let h = m.headers.unwrap();
        if h.get("sy-kind").unwrap().as_str() == "disconnect" {
            assert_eq!(h.get("sy-synthetic").map(|v| v.as_str()), Some("true"));
            assert_eq!(h.get("sy-code").map(|v| v.as_str()), Some("1006"));
            assert!(
                ended.insert(h.get("sy-session").unwrap().to_string()),
                "one disconnect per session"
            );
        }
    }
    let took = killed.elapsed();
    eprintln!("lease {LEASE:?}, window {WINDOW:?}: all 20 synthetic disconnects {took:?} after kill -9");
    assert_eq!(ended, sessions);
    // The last renewal came at most a third of the lease before the kill.
    assert!(
        took >= WINDOW + LEASE * 2 / 3,
        "not before the lease lapsed and the resume window passed: {took:?}"
    );
    // Exactly one router published them.
    let mut total = 0;
    for r in &routers {
        total += sample(&r.admin.to_string(), "switchyard_router_expired_sessions_total").await;
    }
    assert_eq!(total, 20, "one synthetic disconnect per session across both routers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_backend_with_stock_client_answers_clients_on_both_edges() {
    let (url, p) = (env("NATS_URL"), prefix());
    let edges = [spawn("edge", &url, &p, &[]).await, spawn("edge", &url, &p, &[]).await];
    let _router = spawn("router", &url, &p, &[]).await;
    let _py = spawn_python("echo_backend.py", &["--nats", &url, "--prefix", &p, "--topic", "echo"]).await;
    for c in 0..20 {
        let (mut ws, id) = connect(&edges[c % 2].ws("/ws/echo")).await;
        ws.send(Message::text(format!("hi {id}"))).await.unwrap();
        ws.send(Message::binary(vec![c as u8, 0xff])).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text(format!("py:hi {id}")));
        assert_eq!(
            next_data(&mut ws).await,
            Message::binary(vec![b'p', b'y', b':', c as u8, 0xff])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_loses_no_acknowledged_frame_and_counts_the_rest() {
    let bin = env("NATS_SERVER_BIN");
    let store = std::env::temp_dir().join(unique("js"));
    let port = free_port().to_string();
    let start_nats = || {
        tokio::process::Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd", store.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server")
    };
    let mut nats = start_nats();
    let url = format!("nats://127.0.0.1:{port}");
    let ready = |url: String| async move {
        for _ in 0..100 {
            if async_nats::connect(&url).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nats-server did not start");
    };
    ready(url.clone()).await;
    let p = prefix();
    let gw = spawn("standalone", &url, &p, &["--outage-buffer", "64"]).await;
    let ws_url = gw.ws("/ws");
    let readyz = gw.admin("/readyz");

    let until = Instant::now() + Duration::from_secs(6);
    let senders: Vec<_> = (0..10).map(|_| tokio::spawn(sender(ws_url.clone(), until))).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await; // let traffic flow first
    nats.kill().await.unwrap();
    // /readyz turns 503 while the bus is down.
    let mut saw_503 = false;
    for _ in 0..100 {
        if reqwest::get(&readyz).await.unwrap().status() == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "/readyz reports the outage");
    let _nats2 = start_nats();
    ready(url.clone()).await;

    let mut results = Vec::new();
    for s in senders {
        results.push(s.await.unwrap());
    }
    // What the stream holds, per session.
    let nc = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let stream_name = format!("{}_IN", p.to_uppercase());
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let total = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    let mut msgs = consumer.fetch().max_messages(total as usize).messages().await.unwrap();
    let mut read = 0u64;
    while read < total {
        let m = tokio::time::timeout(WAIT, msgs.next()).await.unwrap().unwrap().unwrap();
        read += 1;
        let h = m.headers.clone().unwrap();
        if h.get("sy-kind").unwrap().as_str() == "frame" {
            let v: u64 = serde_json::from_slice(&m.payload).unwrap();
            stored
                .entry(h.get("sy-session").unwrap().to_string())
                .or_default()
                .push(v);
        }
    }
    let (acked_n, told_n, told_but_stored) = account(&results, &mut stored);
    let refused = sample(
        &gw.admin.to_string(),
        r#"switchyard_drops_total{route="/ws",reason="bus_refused"}"#,
    )
    .await;
    eprintln!(
        "nats restart: {acked_n} acked (all stored), {told_n} refused and told ({told_but_stored} of them stored anyway: ack lost with the server), metric bus_refused={refused}"
    );
    assert!(acked_n > 0);
    assert_eq!(refused as usize, told_n, "every refusal counted exactly");
}

/// A close reason with CR/LF (client-chosen text) must not break the session's teardown on
/// NATS (header values may not hold line breaks): the backend still gets the disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_reason_with_line_breaks_still_yields_a_disconnect() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let (url, p) = (env("NATS_URL"), prefix());
    let edge = spawn("edge", &url, &p, &[]).await;
    let nc = async_nats::connect(&url).await.unwrap();
    let mut inbound = nc.subscribe(format!("{p}.in.echo.*")).await.unwrap();
    nc.flush().await.unwrap();
    let (mut ws, id) = connect(&edge.ws("/ws/echo")).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye\r\nX-Injected: 1".into(),
    }))
    .await
    .unwrap();
    let h = next_of(&mut inbound, "disconnect", &id).await;
    assert_eq!(h.get("sy-reason").unwrap().as_str(), "byeX-Injected: 1");
    assert!(h.get("X-Injected").is_none(), "no header injection");
    // The edge is still serving.
    let (mut ws2, _) = connect(&edge.ws("/ws/echo")).await;
    close_normal(&mut ws2).await;
}

/// Our close asks the client to close; it does not wait for ever. A client that ignores it and
/// keeps sending is cut off once the close wait (the shutdown grace, here 1 s) is over, even
/// though every frame it sends waits for a JetStream acknowledgement (so the session always has
/// a publish in flight), and the backend is told with a disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_our_close_and_keeps_sending_is_cut_off() {
    let (url, p) = (env("NATS_URL"), prefix());
    // Standalone: the admin API's close goes through the outbound topic and a router. The
    // frame-flood guard is raised out of the way: this client sends as fast as it can, and
    // the close it must get is the close timeout, not a 1008.
    let edge = spawn(
        "standalone",
        &url,
        &p,
        &["--shutdown-grace", "1s", "--max-frames-per-second", "10000000"],
    )
    .await;
    let nc = async_nats::connect(&url).await.unwrap();
    let mut inbound = nc.subscribe(format!("{p}.in.echo.*")).await.unwrap();
    nc.flush().await.unwrap();
    let (mut ws, id) = connect(&edge.ws("/ws/echo")).await;
    let r = reqwest::Client::new()
        .delete(edge.admin(&format!("/api/sessions/{id}?code=4000&reason=bye")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Never reads (so never answers the close); sends until the socket is cut.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sent = 0u64;
    loop {
        match tokio::time::timeout_at(deadline, ws.send(Message::text(format!("{sent}")))).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) => break, // cut off
            Err(_) => panic!("still open after {sent} frames sent past our close"),
        }
    }
    let h = next_of(&mut inbound, "disconnect", &id).await;
    assert_eq!(h.get("sy-code").unwrap().as_str(), "1001");
    assert_eq!(h.get("sy-reason").unwrap().as_str(), "close timeout");
}

/// An edge frozen past its lease (SIGSTOP) comes back to find its sessions ended by a router:
/// it must not keep them as zombies whose replies go nowhere. It closes them with 1012.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_lost_its_lease_closes_its_sessions_1012() {
    let (url, p) = (env("NATS_URL"), prefix());
    let edge = spawn("edge", &url, &p, &["--lease", "2s"]).await;
    // The router ends the sessions of a lapsed lease once the resume window has passed too.
    let _router = spawn("router", &url, &p, &["--lease", "2s", "--resume-window", "1s"]).await;
    let nc = async_nats::connect(&url).await.unwrap();
    let mut inbound = nc.subscribe(format!("{p}.in.echo.*")).await.unwrap();
    nc.flush().await.unwrap();
    let (mut ws, id) = connect(&edge.ws("/ws/echo")).await;
    // The upgrade answers before the edge registers the session. Freezing the edge before it
    // has would leave no session for the router to end; its connect record on the inbound
    // subject is published last, after the registry and the session feed.
    next_of(&mut inbound, "connect", &id).await;
    let pid = edge.child.id().unwrap().to_string();
    let signal = |sig: &str| send_signal(&pid, sig);
    signal("-STOP");
    // The router ends the session while the edge is frozen.
    let h = next_of(&mut inbound, "disconnect", &id).await;
    assert_eq!(h.get("sy-synthetic").map(|v| v.as_str()), Some("true"));
    signal("-CONT");
    assert_eq!(
        close_code(&mut ws).await,
        Some(1012),
        "the resumed edge closes what it can no longer serve"
    );
    // And it serves new sessions on a fresh lease.
    let (mut ws2, _) = connect(&edge.ws("/ws/echo")).await;
    close_normal(&mut ws2).await;
}

/// TLS to the broker: a nats-server that requires TLS is reachable with `--bus-tls-ca`, and
/// refused (exit 69, before serving) without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_nats_with_a_trusted_ca_and_refused_without() {
    let bin = env("NATS_SERVER_BIN");
    let dir = std::env::temp_dir().join(unique("natstls"));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = pki();
    let (cert, key, ca) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("ca.pem"));
    leaf(&pki, &cert, &key);
    write_ca(&pki, &ca);
    let port = free_port();
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ntls {{ cert_file: \"{}\"\n key_file: \"{}\"\n timeout: 2 }}\n",
            dir.join("js").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let _nats = tokio::process::Command::new(&bin)
        .args(["-c", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server");
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nats-server listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("nats://localhost:{port}");
    let p = prefix();
    // Runs the edge to its exit, with `extra` flags; it must not start.
    let run = |extra: Vec<String>| {
        let mut args = [
            "standalone",
            "--bus",
            &url,
            "--prefix",
            &p,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra);
        async move {
            tokio::time::timeout(WAIT, tokio::process::Command::new(binary()).args(args).output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let missing = dir.join("nope.pem").display().to_string();
    let out = run(vec!["--bus-tls-ca".into(), missing]).await;
    assert_eq!(out.status.code(), Some(64), "a missing CA file is a config error");
    // Untrusted: the edge does not start.
    let out = run(Vec::new()).await;
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    // Trusted CA: works end to end.
    let gw = spawn(
        "standalone",
        &url,
        &p,
        &["--demo", "--bus-tls-ca", ca.to_str().unwrap()],
    )
    .await;
    let (mut ws, id) = connect(&gw.ws("/ws/echo")).await;
    echo_in_order(&mut ws, &id, 20).await;
}

/// A nats-server of the test's own (so it can be stopped), on a free port, ready.
async fn own_nats() -> (tokio::process::Child, String) {
    let port = free_port();
    let store = std::env::temp_dir().join(unique("js"));
    let child = tokio::process::Command::new(env("NATS_SERVER_BIN"))
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            store.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server");
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + WAIT;
    while async_nats::connect(&url).await.is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_gone_ends_in_bounded_time_and_says_what_was_lost() {
    // Before: an edge and a router whose nats-server had stopped never exited on SIGTERM.
    let (mut nats, url) = own_nats().await;
    let p = prefix();
    let mut edge = spawn("edge", &url, &p, &["--shutdown-grace", "1s"]).await;
    let mut router = spawn("router", &url, &p, &[]).await;
    let nc = async_nats::connect(&url).await.unwrap();
    let mut tap = nc.subscribe(format!("{p}.in.echo.>")).await.unwrap();
    nc.flush().await.unwrap();
    let (mut ws, id) = connect(&edge.ws("/ws/echo")).await;
    // The session is idle (its connect published) when the broker goes away.
    next_of(&mut tap, "connect", &id).await;
    nats.kill().await.unwrap();
    // Wait until the edge has noticed the outage (readyz 503), so the drain meets a dead bus.
    let readyz = edge.admin("/readyz");
    let deadline = Instant::now() + WAIT;
    while reqwest::get(&readyz).await.unwrap().status() != 503 {
        assert!(Instant::now() < deadline, "/readyz reports the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client reads from now on: a process that exits while the client has not read its
    // close frame resets the connection, and a reset can discard what was not read yet.
    let client = tokio::spawn(async move { close_code(&mut ws).await });
    edge.term();
    router.term();
    let sigterm = Instant::now();
    // The client is still told to reconnect elsewhere.
    assert_eq!(client.await.unwrap(), Some(1012));
    // Drain grace 0 + shutdown grace 1 s + 1 s (sessions) + 1 s (lease) + 3 s (flush and
    // stop) + 1 s (runtime) = 7 s at most by design; 20 s here only guards against a hang.
    let bound = Duration::from_secs(20);
    let edge_status = tokio::time::timeout(bound, edge.child.wait())
        .await
        .expect("the edge exits after SIGTERM with its broker gone")
        .unwrap();
    let router_status = tokio::time::timeout(bound, router.child.wait())
        .await
        .expect("the router exits after SIGTERM with its broker gone")
        .unwrap();
    eprintln!(
        "edge exited {edge_status:?}, router {router_status:?}, {:?} after SIGTERM",
        sigterm.elapsed()
    );
    // The session's disconnect could not be published: the edge says so and exits non-zero.
    assert_eq!(edge_status.code(), Some(1), "edge: {:?}", edge.log_tail());
    let log = edge.log_tail().join("\n");
    assert!(log.contains("shutdown incomplete"), "{log}");
    assert!(log.contains("disconnect"), "the lost disconnect is named: {log}");
    // The router exits by itself, with a code (not a signal).
    assert!(router_status.code().is_some(), "router: {:?}", router.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sessions_registry_marker_expires() {
    // Each removal from the KV registry leaves a marker; without a TTL the bucket keeps one per
    // session that ever existed. The marker must carry one.
    let (url, p) = (env("NATS_URL"), prefix());
    let edge = spawn("edge", &url, &p, &[]).await;
    let (mut ws, id) = connect(&edge.ws("/ws/echo")).await;
    close_normal(&mut ws).await;
    assert_eq!(close_code(&mut ws).await, Some(1000));
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let bucket = format!("{p}_sessions");
    let stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
    let subject = format!("$KV.{bucket}.s.{id}");
    let deadline = Instant::now() + WAIT;
    let marker = loop {
        let m = stream.get_last_raw_message_by_subject(&subject).await.unwrap();
        if m.headers.get("KV-Operation").map(|v| v.as_str()) == Some("PURGE") {
            break m;
        }
        assert!(Instant::now() < deadline, "the session's removal reaches the registry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ttl = marker.headers.get("Nats-TTL").map(|v| v.as_str().to_owned());
    assert_eq!(ttl.as_deref(), Some("900"), "the marker expires after 15 minutes");
    let info = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert!(info.allow_message_ttl, "the bucket takes per-message TTLs");
}

/// With `--nats-durable-replies` (the default) the routers read `sy.out` from the work-queue
/// stream `<PREFIX>_OUT`, one at a time (a pinned client), acknowledging each record once
/// forwarded. The one forwarding is killed with SIGKILL mid-stream: the other takes the pin,
/// gets what was not acknowledged again, and every acknowledged send is answered; duplicates
/// are counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_stream_loses_no_acknowledged_reply_on_nats() {
    let (url, p) = (env("NATS_URL"), prefix());
    let edge = spawn("edge", &url, &p, &[]).await;
    let mut routers = [
        spawn("router", &url, &p, &[]).await,
        spawn("router", &url, &p, &[]).await,
    ];
    let _demo = spawn("demo", &url, &p, &[]).await;
    let until = Instant::now() + Duration::from_secs(8);
    let clients: Vec<_> = (0..20)
        .map(|_| tokio::spawn(send_and_collect_replies(edge.ws("/ws"), until)))
        .collect();
    // The router holding the pin is the one forwarding: once it has forwarded 200, kill it.
    let deadline = Instant::now() + WAIT;
    let active = loop {
        let mut found = None;
        for (i, r) in routers.iter().enumerate() {
            if sample(&r.admin.to_string(), "switchyard_router_forwarded_total").await >= 200 {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(Instant::now() < deadline, "no router forwarded 200 replies");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    routers[active].kill9();
    let survivor = &routers[1 - active];
    let (acked_n, dups) = every_acked_send_answered(clients).await;
    let took_over = sample(&survivor.admin.to_string(), "switchyard_router_forwarded_total").await;
    assert!(took_over > 0, "the surviving router forwarded nothing");
    eprintln!(
        "NATS router SIGKILL mid-stream: {acked_n} acknowledged sends, every one answered; {dups} duplicate replies; the survivor forwarded {took_over}"
    );
}
