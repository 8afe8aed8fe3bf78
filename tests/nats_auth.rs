//! Broker authentication on a real nats-server configured to require it: user/password, token,
//! NKey and a `.creds` file (decentralised auth, operator mode). The right secret serves an
//! echo end to end; a wrong one exits 69 with one line naming the broker and the mechanism,
//! and no secret anywhere in stderr. Needs NATS_SERVER_BIN (`scripts/test` exports it).

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn nats_bin() -> String {
    std::env::var("NATS_SERVER_BIN")
        .unwrap_or_else(|_| panic!("NATS_SERVER_BIN is not set: run ./scripts/test, which provisions nats-server"))
}

/// A nats-server of this test's own, with `auth` (config text) added to a JetStream config.
struct AuthNats {
    child: tokio::process::Child,
    url: String,
    dir: PathBuf,
}

impl Drop for AuthNats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl AuthNats {
    async fn start(auth: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("natsauth"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\n{auth}\n",
                dir.join("js").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("nats.log")).unwrap();
        let child = tokio::process::Command::new(nats_bin())
            .args(["-c", conf.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server");
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server listening: {}",
                std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
        }
    }

    /// Writes `text` to a file in this server's directory.
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// Right credentials: an edge + router + demo backends serve an echo end to end.
    async fn serves_echo_with(&self, flags: &[&str]) {
        let mut all = vec!["--demo"];
        all.extend_from_slice(flags);
        let gw = spawn("standalone", &self.url, &unique("t"), &all).await;
        let (mut ws, id) = connect(&gw.ws("/ws/echo")).await;
        echo_in_order(&mut ws, &id, 10).await;
        close_normal(&mut ws).await;
    }

    /// Wrong credentials: exit 69, one stderr line naming the bus URL and `(nats, MECHANISM)`,
    /// none of `secrets` in it. Returns the line.
    async fn refuses(&self, flags: &[&str], env: &[(&str, &str)], mechanism: &str, secrets: &[&str]) -> String {
        let prefix = unique("t");
        let mut args = vec!["standalone", "--demo", "--bus", &self.url, "--prefix", &prefix];
        args.extend_from_slice(flags);
        let want = format!(
            "switchyard: cannot open bus {}: authentication failed (nats, {mechanism})",
            self.url
        );
        let took = refused_start(&args, env, &want, secrets).await;
        assert!(took < Duration::from_secs(5), "fails fast, not after retries: {took:?}");
        want
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let (right, wrong) = ("correct-horse-battery", "wrong-horse-battery");
    let nats = AuthNats::start(&format!(
        "authorization {{ users = [ {{ user: \"alice\", password: \"{right}\" }} ] }}"
    ))
    .await;
    let pw = nats.file("password", &format!("{right}\n"));
    nats.serves_echo_with(&["--bus-user", "alice", "--bus-password-file", &pw])
        .await;
    let bad = nats.file("bad-password", wrong);
    nats.refuses(
        &["--bus-user", "alice", "--bus-password-file", &bad],
        &[],
        "user/password",
        &[wrong, right],
    )
    .await;
    nats.refuses(
        &["--bus-user", "alice"],
        &[("SWITCHYARD_BUS_PASSWORD", wrong)],
        "user/password",
        &[wrong, right],
    )
    .await;
    // A server that wants credentials and gets none.
    nats.refuses(&[], &[], "no credentials given", &[right]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let (right, wrong) = ("s3cr3t-token-f00d", "s3cr3t-token-beef");
    let nats = AuthNats::start(&format!("authorization {{ token: \"{right}\" }}")).await;
    let file = nats.file("token", right);
    nats.serves_echo_with(&["--bus-token-file", &file]).await;
    nats.refuses(&[], &[("SWITCHYARD_BUS_TOKEN", wrong)], "token", &[wrong, right])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let nats = AuthNats::start(&format!(
        "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
        user.public_key()
    ))
    .await;
    let (seed, other) = (user.seed().unwrap(), stranger.seed().unwrap());
    let file = nats.file("user.nk", &format!("{seed}\n"));
    nats.serves_echo_with(&["--bus-nkey-seed-file", &file]).await;
    let bad = nats.file("stranger.nk", &other);
    nats.refuses(&["--bus-nkey-seed-file", &bad], &[], "nkey", &[&seed, &other])
        .await;
}

/// A JWT as nsc signs it: `{"typ":"JWT","alg":"ed25519-nkey"}`, the claims, an ed25519
/// signature by `issuer` (all base64url without padding).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": unique("j").to_uppercase(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let sig = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{sig}")
}

/// A `.creds` file: the user JWT and the user seed, in nsc's decorated format.
fn creds(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// Decentralised auth without the nsc tool: an operator, an account with JetStream and a user,
/// as JWTs signed here with the nkeys crate; the server trusts the operator and has the
/// account preloaded (memory resolver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_pub = operator.public_key();
    let op_jwt = jwt(
        &operator,
        &op_pub,
        "O",
        serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let acc_jwt = jwt(
        &operator,
        &account.public_key(),
        "A",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let sys_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2, "limits": {"subs": -1, "data": -1, "payload": -1, "conn": -1}}),
    );
    let user_claims = serde_json::json!({
        "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
    });
    let user_jwt = jwt(&account, &user.public_key(), "u", user_claims.clone());
    let nats = AuthNats::start(&format!(
        "operator: \"{op_jwt}\"\nsystem_account: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n {}: \"{acc_jwt}\"\n {}: \"{sys_jwt}\"\n}}",
        system.public_key(),
        account.public_key(),
        system.public_key(),
    ))
    .await;
    let seed = user.seed().unwrap();
    let file = nats.file("user.creds", &creds(&user_jwt, &seed));
    nats.serves_echo_with(&["--bus-creds-file", &file]).await;
    // A user vouched for by an account the server does not know.
    let rogue = nkeys::KeyPair::new_account();
    let intruder = nkeys::KeyPair::new_user();
    let (rogue_jwt, intruder_seed) = (
        jwt(&rogue, &intruder.public_key(), "x", user_claims),
        intruder.seed().unwrap(),
    );
    let bad = nats.file("rogue.creds", &creds(&rogue_jwt, &intruder_seed));
    nats.refuses(
        &["--bus-creds-file", &bad],
        &[],
        "creds file",
        &[&intruder_seed, &seed, &rogue_jwt],
    )
    .await;
}

/// Bad authentication settings are configuration errors: one line, exit 64, before any port
/// is bound, and the line never quotes a secret.
#[test]
fn bad_auth_config_is_one_line_and_exit_64_before_binding() {
    let dir = std::env::temp_dir().join(unique("sy-authcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| -> String {
        let p: &Path = &dir.join(name);
        std::fs::write(p, text).unwrap();
        p.display().to_string()
    };
    let secret = "hunter2-top-secret";
    let pw = write("pw", secret);
    let token = write("token", secret);
    let empty = write("empty", "\n");
    let not_seed = write("seed", &format!("SU{secret}"));
    let account_seed = write("account.nk", &nkeys::KeyPair::new_account().seed().unwrap());
    let not_creds = write("creds", secret);
    let missing = dir.join("missing").display().to_string();
    // The client address is taken: had the process bound before validating, the message
    // would be about the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let nats = "nats://127.0.0.1:4222";
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--bus", nats, "--bus-user", "alice"], vec![], "needs a password"),
        (
            vec!["--bus", nats, "--bus-password-file", &pw],
            vec![],
            "needs --bus-user",
        ),
        (
            vec!["--bus", nats, "--bus-user", "alice", "--bus-password-file", &missing],
            vec![],
            "cannot read --bus-password-file",
        ),
        (vec!["--bus", nats, "--bus-token-file", &empty], vec![], "is empty"),
        (
            vec!["--bus", nats, "--bus-token-file", &token],
            vec![("SWITCHYARD_BUS_TOKEN", secret)],
            "both set",
        ),
        (
            vec!["--bus", nats, "--bus-token-file", &token, "--bus-user", "alice"],
            vec![("SWITCHYARD_BUS_PASSWORD", secret)],
            "user/password and token given at once",
        ),
        (
            vec!["--bus", nats, "--bus-nkey-seed-file", &not_seed],
            vec![],
            "does not decode",
        ),
        (
            vec!["--bus", nats, "--bus-nkey-seed-file", &account_seed],
            vec![],
            "not a user seed",
        ),
        (
            vec!["--bus", nats, "--bus-creds-file", &not_creds],
            vec![],
            "not a NATS credentials file",
        ),
        (
            vec!["--bus-token-file", &token],
            vec![],
            "given for memory://, which has no broker",
        ),
        (
            vec!["--bus", "nats://alice:hunter2-top-secret@127.0.0.1:4222"],
            vec![],
            "URL with credentials",
        ),
        (
            vec!["--bus", "nats://hunter2-top-secret@127.0.0.1:4222"],
            vec![],
            "URL with credentials",
        ),
    ];
    for (args, env, expect) in cases {
        let mut c = std::process::Command::new(binary());
        c.args(["--listen", &addr, "--admin", "127.0.0.1:0"]).args(&args);
        for (k, v) in &env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err:?}");
        assert!(!err.contains("in use"), "validated before binding: {err}");
        assert!(!err.contains(secret), "no secret in {err:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
