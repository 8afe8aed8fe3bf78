//! Readings from `/proc`: RSS and CPU time of one process ([`process`], also what the `sample`
//! mode reports) and of a server's whole process tree, this process's own CPU time, the
//! machine's busy time and load average, and kernel memory (slab, TCP buffer pages).
//!
//! A "server" is a PID plus all its descendants, so multi-process peers (Pushpin's runner spawns
//! condure, pushpin-proxy and pushpin-handler) are measured whole.

use std::collections::HashMap;
use std::fs;

/// Linux `USER_HZ`: the unit of utime/stime in `/proc/PID/stat`. It is 100 on every Linux ABI
/// this runs on (the kernel converts to it regardless of `CONFIG_HZ`).
const USER_HZ: u64 = 100;
/// Bytes per page: the unit of the `mem` count in `/proc/net/sockstat`.
const PAGE_SIZE: u64 = 4096;
/// Index of the parent PID in [`stat_fields`].
const STAT_PPID: usize = 1;
/// Index of utime (user CPU time, ticks) in [`stat_fields`].
const STAT_UTIME: usize = 11;
/// Index of stime (system CPU time, ticks) in [`stat_fields`].
const STAT_STIME: usize = 12;

/// `pid` and every live descendant of it.
pub(crate) fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(st) = stat_fields(p) {
                if let Some(ppid) = st.get(STAT_PPID).and_then(|s| s.parse::<u32>().ok()) {
                    children.entry(ppid).or_default().push(p);
                }
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend_from_slice(c);
        }
        i += 1;
    }
    out
}

/// Fields of `/proc/PID/stat` after the `(comm)` field: index 0 = state, 1 = ppid, 11 = utime,
/// 12 = stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// (utime + stime, stime) of one process (all its threads), in microseconds.
fn cpu_times_us(pid: u32) -> Option<(u64, u64)> {
    let f = stat_fields(pid)?;
    let u: u64 = f.get(STAT_UTIME)?.parse().ok()?;
    let s: u64 = f.get(STAT_STIME)?.parse().ok()?;
    Some(((u + s) * 1_000_000 / USER_HZ, s * 1_000_000 / USER_HZ))
}

/// A field of a `/proc/PID/status` text in kB (`VmRSS`, `RssAnon`, ...); 0 when absent.
fn status_kb(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One reading of one process (all its threads).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProcSample {
    /// `VmRSS`, bytes.
    pub rss: u64,
    /// `RssAnon`, bytes.
    pub rss_anon: u64,
    /// utime + stime, µs.
    pub cpu_us: u64,
    /// stime alone (CPU time spent in the kernel), µs.
    pub sys_us: u64,
}

/// Reads one process; `None` once it is gone. A zombie has no `VmRSS`: RSS 0, its CPU time kept.
pub(crate) fn process(pid: u32) -> Option<ProcSample> {
    let (cpu_us, sys_us) = cpu_times_us(pid)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        rss: status_kb(&status, "VmRSS") * 1024,
        rss_anon: status_kb(&status, "RssAnon") * 1024,
        cpu_us,
        sys_us,
    })
}

/// One reading of a server process tree.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ServerSample {
    /// Sum of `VmRSS` over the tree, bytes.
    pub rss: u64,
    /// Sum of `RssAnon` over the tree, bytes (heap + stacks; excludes mapped files).
    pub rss_anon: u64,
    /// Sum of utime + stime over the tree, µs.
    pub cpu_us: u64,
    pub processes: usize,
}

/// Reads the tree rooted at `pid`; all zeros when no PID was given.
pub(crate) fn server(pid: Option<u32>) -> ServerSample {
    let Some(pid) = pid else {
        return ServerSample::default();
    };
    let pids = tree(pid);
    let mut s = ServerSample {
        processes: pids.len(),
        ..ServerSample::default()
    };
    for p in pids.into_iter().filter_map(process) {
        s.rss += p.rss;
        s.rss_anon += p.rss_anon;
        s.cpu_us += p.cpu_us;
    }
    s
}

/// This process's CPU time, µs.
pub(crate) fn self_cpu_us() -> u64 {
    cpu_times_us(std::process::id()).map_or(0, |(cpu, _)| cpu)
}

/// Busy CPU time of the whole machine (all CPUs: user + nice + system + irq + softirq +
/// steal), µs, from the first line of `/proc/stat`.
pub(crate) fn machine_busy_us() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = s.lines().next() else {
        return 0;
    };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| *x)
        .sum();
    busy * 1_000_000 / USER_HZ
}

/// The 1-, 5- and 15-minute load averages from `/proc/loadavg` (zeros if unreadable).
pub(crate) fn loadavg() -> [f64; 3] {
    let mut out = [0.0; 3];
    if let Ok(s) = fs::read_to_string("/proc/loadavg") {
        for (o, v) in out.iter_mut().zip(s.split_whitespace()) {
            *o = v.parse().unwrap_or(0.0);
        }
    }
    out
}

/// Kernel-side memory, machine-wide (so it includes the load generator's own sockets: on
/// loopback both ends of every connection live in this kernel).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KernelSample {
    /// `Slab:` from `/proc/meminfo`, bytes.
    pub slab: u64,
    /// `TCP: ... mem N` from `/proc/net/sockstat` (pages of socket buffers), bytes.
    pub tcp_mem: u64,
    /// `TCP: inuse N` from `/proc/net/sockstat`.
    pub tcp_inuse: u64,
}

pub(crate) fn kernel() -> KernelSample {
    let slab = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Slab:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let (mut tcp_mem, mut tcp_inuse) = (0, 0);
    if let Ok(s) = fs::read_to_string("/proc/net/sockstat") {
        if let Some(l) = s.lines().find(|l| l.starts_with("TCP:")) {
            let toks: Vec<&str> = l.split_whitespace().collect();
            for w in toks.windows(2) {
                match w[0] {
                    "mem" => tcp_mem = w[1].parse::<u64>().unwrap_or(0) * PAGE_SIZE,
                    "inuse" => tcp_inuse = w[1].parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    KernelSample {
        slab,
        tcp_mem,
        tcp_inuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let s = server(Some(std::process::id()));
        assert!(s.rss > 0);
        assert!(s.processes >= 1);
        assert!(kernel().slab > 0);
        let me = process(std::process::id()).unwrap();
        assert!(me.rss > 0 && me.rss_anon > 0 && me.sys_us <= me.cpu_us);
        assert!(process(u32::MAX).is_none());
    }
}
