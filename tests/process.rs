//! The real `switchyard` binary as a child process: config errors, SIGTERM drain, --help.

mod common;

use common::*;
use futures::SinkExt;
use tokio_tungstenite::tungstenite::Message;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(binary());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run switchyard")
}

#[test]
fn bad_config_is_one_line_and_exit_64_before_binding() {
    let dir = std::env::temp_dir().join(unique("sy-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_routes = dir.join("routes.toml");
    std::fs::write(
        &bad_routes,
        "[[route]]\npath = \"/x\"\ntopic = \"t\"\nmode = \"sideways\"\n",
    )
    .unwrap();
    let dup_routes = dir.join("dup.toml");
    std::fs::write(
        &dup_routes,
        "[[route]]\npath='/x'\ntopic='t'\nmode='raw'\n[[route]]\npath='/x'\ntopic='u'\nmode='raw'\n",
    )
    .unwrap();
    // Every case binds an address that is already taken: had the process bound before
    // validating, the message would be about the port, not the config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // (flags, environment, what the error line must say)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--bus", "redis://x"], vec![], "unknown scheme"),
        (vec!["--bus", "localhost:4222"], vec![], "invalid bus URL"),
        (vec![], vec![("SWITCHYARD_BUS", "ftp://x")], "unknown scheme"),
        (vec!["--listen", "nonsense"], vec![], "--listen"),
        (
            vec!["--routes", "/nonexistent/routes.toml"],
            vec![],
            "cannot read route file",
        ),
        (
            vec!["--routes", bad_routes.to_str().unwrap()],
            vec![],
            "unknown variant",
        ),
        (vec!["--routes", dup_routes.to_str().unwrap()], vec![], "duplicate path"),
        (vec!["--node-id", "a.b"], vec![], "invalid node id"),
        (
            vec!["--ping-interval", "30s", "--idle-timeout", "10s"],
            vec![],
            "idle timeout",
        ),
        (vec!["--ping-interval", "soon"], vec![], "--ping-interval"),
        (vec!["--max-message-size", "0"], vec![], "max message size"),
        (vec!["edge"], vec![], "needs a shared bus"),
        (vec!["--prefix", "a b"], vec![], "--prefix"),
    ];
    for (args, env, expect) in cases {
        let mut all = vec!["--listen", &addr, "--admin", &addr];
        all.extend(args.iter().copied());
        let out = run(&all, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err:?}");
        assert!(!err.contains("in use"), "validated before binding: {err}");
    }
    // A taken port (valid config) is a different failure: 69, naming the address.
    let out = run(&["--listen", &addr, "--admin", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
    // So is a broker nobody answers on: 69, one line naming the bus.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bus = format!("nats://{closed}");
    let out = run(
        &[
            "edge",
            "--bus",
            &bus,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("cannot open bus") && err.contains(&bus), "{err}");
}

#[test]
fn help_documents_every_option() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--bus",
        "--listen",
        "--admin",
        "--node-id",
        "--routes",
        "--demo",
        "--prefix",
        "--max-message-size",
        "--ping-interval",
        "--idle-timeout",
        "--shutdown-grace",
        "--bus-buffer",
        "--bus-user",
        "--bus-password-file",
        "SWITCHYARD_BUS_PASSWORD",
        "--bus-token-file",
        "SWITCHYARD_BUS_TOKEN",
        "--bus-nkey-seed-file",
        "--bus-creds-file",
        "--bus-sasl-mechanism",
        "--log",
        "--log-format",
        "SWITCHYARD_BUS",
        "standalone",
        "edge",
        "router",
        "demo",
    ] {
        assert!(help.contains(opt), "--help mentions {opt}");
    }
}

/// Graceful drain: SIGTERM → `/readyz` 503 and no new connections at once; open sessions keep
/// working through the drain grace; then 1012; exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_closes_clients_1012_and_exits_zero() {
    let (mut child, client, admin, logs) = spawn_binary(&[
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--drain-grace",
        "2s",
        "--shutdown-grace",
        "3s",
    ])
    .await;
    let client = client.expect("edge address");
    let (mut ws, _) = connect(&format!("ws://{client}/ws/echo")).await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("before"));
    let ready = reqwest::get(format!("http://{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let pid = child.id().unwrap() as i32;
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let term = std::time::Instant::now();
    // readyz turns 503 (polled: the signal is handled asynchronously).
    let deadline = term + WAIT;
    loop {
        let r = reqwest::get(format!("http://{admin}/readyz")).await.unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "readyz never turned 503");
        tokio::task::yield_now().await;
    }
    // No new sockets while draining: the listener still answers, with 503...
    match tokio_tungstenite::connect_async(format!("ws://{client}/ws/echo")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503 during the drain, got {:?}", other.map(|_| ())),
    }
    // ...but the open one still works until the grace ends.
    ws.send(Message::text("during")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("during"));
    assert_eq!(close_code(&mut ws).await, Some(1012));
    assert!(
        term.elapsed() >= std::time::Duration::from_millis(1900),
        "closed only after the 2 s drain grace ({:?})",
        term.elapsed()
    );
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let logs = logs.await.unwrap().join("\n");
    assert!(logs.contains("shutdown complete"), "{logs}");
}

/// JSON logs carry the W3C trace id of the handshake's `traceparent` on every line a session
/// logs, and the session's close is logged with its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_sessions_trace_id() {
    let (mut child, client, _admin, logs) = spawn_binary(&[
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--log",
        "info,switchyard_edge=debug",
    ])
    .await;
    let client = client.expect("edge address");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{client}/ws/echo"
    ))
    .unwrap();
    req.headers_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    let session = resp.headers()["x-switchyard-session"].to_str().unwrap().to_owned();
    ws.send(Message::text("traced")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("traced"));
    close_normal(&mut ws).await;
    // A session without a traceparent gets a generated one (a different trace id).
    let (mut other, _) = connect(&format!("ws://{client}/ws/echo")).await;
    close_normal(&mut other).await;
    send_signal(&child.id().unwrap().to_string(), "-TERM");
    tokio::time::timeout(WAIT, child.wait()).await.expect("exits").unwrap();
    let lines = logs.await.unwrap();
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("non-JSON log line: {l}")))
        .collect();
    let in_span = |v: &serde_json::Value, id: &str| v["span"]["trace_id"] == id;
    let mine: Vec<&serde_json::Value> = parsed.iter().filter(|v| in_span(v, trace_id)).collect();
    assert!(
        mine.iter().any(|v| v["fields"]["message"] == "session opened"),
        "open logged with the trace id: {lines:#?}"
    );
    let closed = mine
        .iter()
        .find(|v| v["fields"]["message"] == "session closed")
        .expect("close logged with the trace id");
    assert_eq!(closed["span"]["session"], session.as_str());
    assert_eq!(closed["fields"]["code"], 1000);
    let generated: Vec<&serde_json::Value> = parsed
        .iter()
        .filter(|v| v["fields"]["message"] == "session closed" && !in_span(v, trace_id))
        .collect();
    assert_eq!(generated.len(), 1, "the other session logs its own trace id");
    let other_id = generated[0]["span"]["trace_id"].as_str().unwrap();
    assert_eq!(other_id.len(), 32);
    assert!(other_id.bytes().all(|b| b.is_ascii_hexdigit()));
}

/// The compose deployment, checked as far as this machine allows (no Docker engine here):
/// files parse, references resolve, the dashboard queries declared metrics.
#[test]
fn compose_files_are_consistent() {
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/compose/check.py"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
