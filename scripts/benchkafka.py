"""`scripts/bench --kafka`: the Kafka path, gateway against bare rdkafka, on one Apache Kafka
broker started for the run (scripts/kafka) and stopped at the end (also on error or Ctrl-C).

- gateway: release `switchyard edge`, `switchyard router` and `switchyard demo` on
  `--bus kafka://…`; the load generator's `unicast` scenario with `--framed-send` drives the
  framed `/ws` route: each session's `send` op (with an `id`, acked once Kafka acknowledged it,
  acks=all) → `<prefix>.in.app` → the demo `app` backend → `<prefix>.out` → the router → the
  node topic → the edge → the socket.
- baseline: bench/kafka-baseline, bare rdkafka clients doing the same per-session
  request/reply (client producer → inbound topic → backend group → reply topic → client
  consumer) with the same sessions, rate and payload.

Two steps per system: `latency` (a rate both carry; p50/p99/max) and `throughput` (a higher
offered rate; frames/s accepted, acks=all). CPU per process comes from the load generator's
`--scenario sample` /proc sampler (one reading a second) over each step's window.
"""

import json
import os
import signal
import subprocess
import time
import urllib.request

from benchlib import REL, ROOT, ProcessGroups, free_port, last_json_line, log

# Seconds a started switchyard process has to answer /readyz with 200.
READY_TIMEOUT = 60.0
# Seconds one load generator or baseline run may take beyond its schedule.
RUN_SLACK = 180
# Seconds a stopped process has to exit after SIGTERM before SIGKILL.
STOP_GRACE = 15.0
# The warm-up run of the gateway before its measured steps (s): topics created, groups joined.
WARM_UP_SECS = 3


def ready(admin, deadline):
    url = f"http://127.0.0.1:{admin}/readyz"
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


class Sampler:
    """loadgen --scenario sample: `track(name, pid)`; `cpu(name, t0, t1)` is that process's CPU
    (cores) between the readings around [t0, t1] (Unix seconds)."""

    def __init__(self, outdir):
        self.path = outdir / "sample.jsonl"
        self.p = subprocess.Popen([str(REL / "loadgen"), "--scenario", "sample", "--sample-secs", "1",
                                   "--out", str(self.path)], stdin=subprocess.PIPE, text=True,
                                  start_new_session=True)

    def track(self, name, pid):
        self.p.stdin.write(f"{name} {pid}\n")
        self.p.stdin.flush()

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()

    def readings(self):
        with open(self.path) as f:
            return [json.loads(l) for l in f if l.strip()]

    def cpu(self, rs, name, t0, t1):
        have = [r for r in rs if name in r["processes"]]
        a = [r for r in have if r["t_unix_ns"] / 1e9 <= t0]
        b = [r for r in have if r["t_unix_ns"] / 1e9 >= t1]
        a = a[-1] if a else (have[0] if have else None)
        b = b[0] if b else (have[-1] if have else None)
        if a is None or b is None or b["t_unix_ns"] <= a["t_unix_ns"]:
            return None
        return (b["processes"][name]["cpu_us"] - a["processes"][name]["cpu_us"]) / (
            (b["t_unix_ns"] - a["t_unix_ns"]) / 1e3)


def publish_seconds(admin):
    """(sum, count) of `switchyard_bus_publish_seconds` (produce until the broker's ack) from a
    process's /metrics; None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    got = {}
    for line in text.splitlines():
        for k in ("sum", "count"):
            if line.startswith(f"switchyard_bus_publish_seconds_{k}"):
                got[k] = got.get(k, 0.0) + float(line.rsplit(" ", 1)[1])
    return (got["sum"], got["count"]) if len(got) == 2 else None


def communicate(p, timeout, logpath):
    """`p`'s standard output; `p` (its own process group) is killed if it overruns `timeout` or
    this script is interrupted."""
    try:
        return p.communicate(timeout=timeout)[0]
    except BaseException as e:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(f"{p.args[0]} timed out after {timeout} s (see {logpath})") from None
        raise


def interrupted(*_):
    raise KeyboardInterrupt


def run_json(cmd, logpath, timeout):
    with open(logpath, "wb") as errf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, start_new_session=True)
        out = communicate(p, timeout, logpath)
    res = last_json_line(out.decode())
    if p.returncode != 0 or res is None:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode} without a result (see {logpath})")
    return res, p.pid


def gateway(a, brokers, outdir, sampler, steps):
    procs = ProcessGroups(outdir)
    common = ["--bus", f"kafka://{brokers}", "--prefix", "gw", "--log", "warn"]
    results = []
    try:
        admins, port = {}, None
        for role in ("demo", "router", "edge"):
            listen, admin = free_port(), free_port()
            extra = ["--node-id", "bench-edge"] if role == "edge" else []
            p = procs.spawn(f"gateway.{role}", [str(REL / "switchyard"), role, "--listen", f"127.0.0.1:{listen}",
                                                "--admin", f"127.0.0.1:{admin}", *common, *extra])
            admins[role] = (admin, p)
            sampler.track(role, p.pid)
            if role == "edge":
                port = listen
        for role, (admin, p) in admins.items():
            if not ready(admin, time.time() + READY_TIMEOUT):
                raise RuntimeError(f"switchyard {role} not ready (exit {p.poll()}; see gateway.{role}.log)")
        edge_pid = admins["edge"][1].pid
        url = f"ws://127.0.0.1:{port}/ws"

        def loadgen(rate, secs, tag):
            cmd = [str(REL / "loadgen"), "--system", "switchyard", "--scenario", "unicast", "--framed-send",
                   "--url", url, "--connections", str(a.sessions), "--per-session-rate", str(rate),
                   "--duration", str(secs), "--payload", str(a.payload), "--drain", str(a.drain),
                   "--server-pid", str(edge_pid), "--tag", tag]
            return run_json(cmd, outdir / f"gateway.{tag}.loadgen.log", secs + RUN_SLACK)

        log(f"== gateway: warm-up {WARM_UP_SECS} s")
        loadgen(1, WARM_UP_SECS, "warmup")
        for step, rate in steps:
            log(f"== gateway: {step} step, {a.sessions} sessions x {rate}/s, {a.step_secs} s")
            t0 = time.time()
            before = {role: publish_seconds(admin) for role, (admin, _) in admins.items()}
            res, _ = loadgen(rate, a.step_secs, step)
            after = {role: publish_seconds(admin) for role, (admin, _) in admins.items()}
            # Mean time from produce to the broker's ack in each process over the step (ms).
            res["publish_ms"] = {role: (1000 * (after[role][0] - before[role][0]) / (after[role][1] - before[role][1])
                                        if before[role] and after[role] and after[role][1] > before[role][1]
                                        else None) for role in admins}
            # The load generator's whole run: the connect ramp (under a second) and the drain too.
            res["window"] = [t0, time.time()]
            results.append((step, res))
    finally:
        procs.stop(["gateway.edge", "gateway.router", "gateway.demo"], wait=STOP_GRACE)
    return results


def fmt_ms(us):
    if us is None:
        return "–"
    ms = us / 1000
    return f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def fmt_cpu(x):
    return "–" if x is None else f"{x * 100:.0f}%"


def report(gw, bl, sampler):
    rs = sampler.readings()
    head = ["system", "step", "sessions", "offered/s", "accepted frames/s", "replies/s", "p50 ms", "p99 ms",
            "max ms", "lost", "dup", "CPU broker", "CPU edge", "CPU router", "CPU backend", "CPU client"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {}
    for system, runs in (("gateway", gw), ("baseline", bl)):
        for step, r in runs:
            by[(system, step)] = r
            t0, t1 = r["window"]
            cpu = lambda n: sampler.cpu(rs, n, t0, t1)
            lat = r.get("latency") or {}
            if system == "gateway":
                procs = [cpu("kafka"), cpu("edge"), cpu("router"), cpu("demo"), r.get("loadgen_cpu_util")]
            else:
                # One process plays client and backend: its CPU is in the client column.
                procs = [cpu("kafka"), None, None, None, cpu_of_baseline(r, sampler, rs)]
            row = [system if system == "gateway" else "bare rdkafka", step, f"{r['connections']:,}",
                   f"{r['offered_per_s']:,.0f}", f"{r['acked_per_s']:,.0f}", f"{r['deliveries_per_s']:,.0f}",
                   fmt_ms(lat.get("p50_us")), fmt_ms(lat.get("p99_us")), fmt_ms(lat.get("max_us")),
                   f"{r['lost']:,}", f"{r['dup']:,}"] + [fmt_cpu(x) for x in procs]
            lines.append("| " + " | ".join(row) + " |")
    out = ["\n".join(lines), ""]
    pub = [f"| {step} | " + " | ".join("–" if r['publish_ms'].get(x) is None else f"{r['publish_ms'][x]:.1f}"
                                      for x in ("edge", "demo", "router")) + " |"
           for step, r in gw if r.get("publish_ms")]
    if pub:
        out += ["Gateway: mean produce → broker ack per record, ms (`switchyard_bus_publish_seconds`): "
                "edge = inbound frames, backend = replies to the outbound topic, router = forwards to "
                "the node topic.", "", "| step | edge | backend | router |", "|---|---|---|---|", *pub, ""]
    rows = ["| target | gateway | baseline | ratio | state |", "|---|---|---|---|---|"]
    g, b = by.get(("gateway", "throughput")), by.get(("baseline", "throughput"))
    if g and b and b["acked_per_s"]:
        r = g["acked_per_s"] / b["acked_per_s"]
        ok = r >= 0.8 and g["lost"] == 0
        rows.append(f"| accepted frames/s ≥ 0.8× baseline (throughput step) | {g['acked_per_s']:,.0f} | "
                    f"{b['acked_per_s']:,.0f} | {r:.2f}× | {'met' if ok else 'MISSED'} |")
    for step in ("latency", "throughput"):
        g, b = by.get(("gateway", step)), by.get(("baseline", step))
        if g and b and b["latency"]["p99_us"]:
            r = g["latency"]["p99_us"] / b["latency"]["p99_us"]
            rows.append(f"| p99 ≤ 1.3× baseline ({step} step) | {fmt_ms(g['latency']['p99_us'])} ms | "
                        f"{fmt_ms(b['latency']['p99_us'])} ms | {r:.2f}× | {'met' if r <= 1.3 else 'MISSED'} |")
    out.append("\n".join(rows))
    return "\n".join(out)


def cpu_of_baseline(r, sampler, rs):
    name = f"baseline.{r.get('tag')}"
    return sampler.cpu(rs, name, *r["window"])


def main(a):
    """Runs the Kafka comparison; returns the exit code."""
    if not a.no_build:
        log("== build (release)")
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "switchyard", "-p", "switchyard-loadgen",
                        "-p", "switchyard-kafka-baseline"], cwd=ROOT, check=True)
    outdir = ROOT / "target" / "bench" / (time.strftime("%Y%m%d-%H%M%S") + "-kafka")
    kdir = outdir / "kafka"
    kdir.mkdir(parents=True)
    steps = [("latency", a.latency_rate), ("throughput", a.throughput_rate)]
    # SIGTERM ends the run like Ctrl-C: the finally blocks stop every process and the broker.
    signal.signal(signal.SIGTERM, interrupted)
    sampler = None
    t = time.time()
    try:
        log(f"== kafka: starting a broker in {kdir}")
        line = subprocess.run([str(ROOT / "scripts" / "kafka"), "start", str(kdir)], check=True,
                              stdout=subprocess.PIPE, text=True, timeout=180).stdout.strip().splitlines()[-1]
        brokers = line.split("=", 1)[1]
        sampler = Sampler(outdir)
        sampler.track("kafka", int((kdir / "kafka.pid").read_text()))
        gw = gateway(a, brokers, outdir, sampler, steps)
        bl = baseline_tracked(a, brokers, outdir, sampler, steps)
    finally:
        if sampler:
            sampler.close()
        subprocess.run([str(ROOT / "scripts" / "kafka"), "stop", str(kdir)], check=False)
    with open(outdir / "results.jsonl", "w") as f:
        for system, runs in (("gateway", gw), ("baseline", bl)):
            for step, r in runs:
                f.write(json.dumps(dict(r, bench_system=system, step=step)) + "\n")
    print(f"\n## scripts/bench --kafka: {a.sessions} sessions, {a.payload} B, {a.step_secs} s per step, "
          f"{time.time() - t:.0f} s\n")
    print(report(gw, bl, sampler))
    print(f"\nRaw results: {outdir}")
    bad = [r for _, r in gw + bl if not r.get("ok")]
    return 1 if bad else 0


def baseline_tracked(a, brokers, outdir, sampler, steps):
    """`baseline`, with each run's process named to the sampler as `baseline.<step>`."""
    results = []
    for i, (step, rate) in enumerate(steps):
        log(f"== baseline: {step} step, {a.sessions} sessions x {rate}/s, {a.step_secs} s")
        cmd = [str(REL / "kafka-baseline"), "--brokers", brokers, "--sessions", str(a.sessions),
               "--per-session-rate", str(rate), "--duration", str(a.step_secs), "--payload", str(a.payload),
               "--drain", str(a.drain), "--topic-prefix", f"kb{i}", "--tag", step]
        logpath = outdir / f"baseline.{step}.log"
        with open(logpath, "wb") as errf:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, start_new_session=True)
            sampler.track(f"baseline.{step}", p.pid)
            out = communicate(p, a.step_secs + RUN_SLACK, logpath)
        res = last_json_line(out.decode())
        if p.returncode != 0 or res is None:
            raise RuntimeError(f"kafka-baseline exited {p.returncode} without a result (see {logpath})")
        w = res.get("measured_unix_ns") or [0, 0]
        res["window"] = [w[0] / 1e9, w[1] / 1e9]
        results.append((step, res))
    return results
