"""What scripts/bench and scripts/bench-scaleout share: paths, logging, loopback ports, processes
in their own process groups, waiting for readiness, the open-file limit and the load
generator's JSON lines.

Both scripts import it from their own directory (`sys.path[0]` is scripts/ when they run).
"""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Binaries: cargo's release dir (honours CARGO_TARGET_DIR like cargo does).
REL = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "release"

# Seconds a probe connection to a local port may take before the port counts as closed.
PORT_PROBE_TIMEOUT = 0.2
# Seconds to wait for a process group that got SIGKILL to be reaped.
KILL_REAP_TIMEOUT = 10.0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    with socket.socket() as s:
        s.settimeout(PORT_PROBE_TIMEOUT)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(ready, proc, deadline, poll):
    """Polls `ready()` every `poll` s until it is true (True), `proc` exited or the wall-clock
    `deadline` (time.time()) passed (False)."""
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(poll)
    return True


def raise_open_files(want=None):
    """Raises the soft open-file limit to `want` (capped at the hard limit; None: the hard limit)
    for this process and its children; returns the new soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want is None:
        soft = hard
    else:
        soft = min(want, hard) if hard != resource.RLIM_INFINITY else want
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def last_json_line(text):
    """The last non-empty line of `text` (the load generator's result line) as JSON; None when
    there is none or it is not JSON."""
    lines = [l for l in text.splitlines() if l.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


class ProcessGroups:
    """Processes started each in its own session (process group), so that stopping one stops
    whatever it spawned; each one's stdout and stderr go to OUTDIR/NAME.log."""

    def __init__(self, outdir):
        self.outdir = outdir
        self.groups = {}  # name -> Popen, in start order

    def spawn(self, name, cmd, cwd=None, stdin=None):
        with open(self.outdir / f"{name}.log", "wb") as logf:
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=stdin, cwd=cwd,
                                 start_new_session=True)
        self.groups[name] = p
        return p

    def stop(self, names, wait):
        """SIGTERM to the groups of `names` (in that order), up to `wait` s in all for them to
        exit, then SIGKILL to what is left."""
        live = [self.groups[n] for n in names if n in self.groups]
        for p in live:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        t = time.time()
        for p in live:
            try:
                p.wait(timeout=max(0.1, wait - (time.time() - t)))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=KILL_REAP_TIMEOUT)


def _signal_group(p, sig):
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
