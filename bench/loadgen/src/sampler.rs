//! `--scenario sample`: the `/proc` sampler of `scripts/bench-scaleout`. Every `--sample-secs`
//! it reads RSS and CPU time (all, and in the kernel) of each named process, then the machine's
//! busy CPU time and load average, and writes one JSON line:
//! `{"t_unix_ns":…,"processes":{NAME:{"rss":…,"cpu_us":…,"sys_us":…},…},"machine_busy_us":…,"loadavg":[…]}`
//! (a process that is gone is left out). Processes are named on standard input, one `NAME PID`
//! line each, at any time; when standard input closes it takes a last reading and exits.
//!
//! Each PID is read alone, not with its descendants (the scale-out run's processes spawn none),
//! through the same reader as the server figures of the other scenarios ([`procfs::process`]).

use crate::procfs;
use crate::Args;
use anyhow::{ensure, Result};
use serde_json::{json, Map, Value};
use std::io::{BufRead, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) fn run(args: &Args) -> Result<()> {
    ensure!(args.sample_secs > 0.0, "--sample-secs must be above 0");
    let period = Duration::from_secs_f64(args.sample_secs);
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let (tx, rx) = mpsc::channel();
    // Reads `NAME PID` lines until standard input closes; dropping `tx` then ends the loop below.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match parse_track(&line) {
                Some(t) => {
                    if tx.send(t).is_err() {
                        break;
                    }
                }
                None => eprintln!("loadgen: sample: ignored {line:?} (want NAME PID)"),
            }
        }
    });
    // Name -> PID, in the order first named; naming a process again replaces its PID.
    let mut tracked: Vec<(String, u32)> = Vec::new();
    let mut next = Instant::now() + period;
    loop {
        match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok((name, pid)) => match tracked.iter_mut().find(|(n, _)| *n == name) {
                Some(t) => t.1 = pid,
                None => tracked.push((name, pid)),
            },
            Err(RecvTimeoutError::Timeout) => {
                writeln!(out, "{}", reading(&tracked))?;
                out.flush()?;
                next = Instant::now() + period;
            }
            Err(RecvTimeoutError::Disconnected) => {
                writeln!(out, "{}", reading(&tracked))?;
                out.flush()?;
                return Ok(());
            }
        }
    }
}

/// `NAME PID` → (name, pid).
fn parse_track(line: &str) -> Option<(String, u32)> {
    let (name, pid) = line.trim().split_once(char::is_whitespace)?;
    Some((name.to_owned(), pid.trim().parse().ok()?))
}

/// One reading of every tracked process, then the time and the machine.
fn reading(tracked: &[(String, u32)]) -> Value {
    let mut processes = Map::new();
    for (name, pid) in tracked {
        if let Some(p) = procfs::process(*pid) {
            processes.insert(
                name.clone(),
                json!({"rss": p.rss, "cpu_us": p.cpu_us, "sys_us": p.sys_us}),
            );
        }
    }
    let t_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    json!({
        "t_unix_ns": t_unix_ns,
        "processes": processes,
        "machine_busy_us": procfs::machine_busy_us(),
        "loadavg": procfs::loadavg(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_track_lines() {
        assert_eq!(parse_track("edge1 4242\n"), Some(("edge1".to_owned(), 4242)));
        assert_eq!(parse_track("  nats-server   7 "), Some(("nats-server".to_owned(), 7)));
        assert_eq!(parse_track("edge1"), None);
        assert_eq!(parse_track("edge1 x"), None);
    }

    #[test]
    fn reads_own_process() {
        let v = reading(&[("me".to_owned(), std::process::id()), ("gone".to_owned(), u32::MAX)]);
        assert!(v["processes"]["me"]["rss"].as_u64().unwrap() > 0);
        assert!(v["processes"].get("gone").is_none());
        assert!(v["t_unix_ns"].as_u64().unwrap() > 0);
        assert_eq!(v["loadavg"].as_array().unwrap().len(), 3);
    }
}
