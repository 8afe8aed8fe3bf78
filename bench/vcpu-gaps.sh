#!/usr/bin/env bash
# Finds the moments a busy CPU did not run at all: samples every task on CPU N with perf's
# software cpu-clock and prints every gap of >= GAP_MS between consecutive samples. Meaningful
# only while the CPU has work all the time (e.g. beside a 16,000-session unicast run pinned to
# CPU 0, which gets a request every ~60 µs): an idle vCPU halts and takes no samples, so gaps on
# an idle CPU mean nothing. On a busy CPU, a gap means the host did not run this vCPU (or did
# not deliver its wake-up). Used to explain the unicast tail in BENCHMARKS.md.
#
#   bench/vcpu-gaps.sh [CPU=0] [SECONDS=15] [GAP_MS=4]
# Needs perf (Debian linux-perf); hardware counters are not needed.
set -euo pipefail
cpu=${1:-0}
secs=${2:-15}
gap_ms=${3:-4}
out=$(mktemp -t vcpu-gaps.XXXXXX)
trap 'rm -f "$out"' EXIT
perf record -q -e cpu-clock -F 2000 -a -C "$cpu" -o "$out" -- sleep "$secs" >/dev/null 2>&1
perf script -i "$out" -F comm,time 2>/dev/null | python3 -c '
import sys
gap = float(sys.argv[1]) / 1000
secs = float(sys.argv[2])
rows = []
for line in sys.stdin:
    parts = line.split()
    rows.append((float(parts[-1].rstrip(":")), " ".join(parts[:-1])))
rows.sort()
if not rows:
    sys.exit("no samples: is perf allowed here (perf_event_paranoid)?")
t0 = rows[0][0]
gaps = [(a[0] - t0, (b[0] - a[0]) * 1000) for a, b in zip(rows, rows[1:]) if b[0] - a[0] >= gap]
lost = sum(g for _, g in gaps)
print(f"cpu {sys.argv[3]}: {len(rows)} samples over {secs:.0f} s; {len(gaps)} gaps >= {gap * 1000:.0f} ms, "
      f"{lost:.0f} ms in all ({lost / (secs * 10):.2f} % of the time)")
if gaps:
    ms = sorted(g for _, g in gaps)
    print(f"gap ms: min {ms[0]:.1f}, median {ms[len(ms) // 2]:.1f}, max {ms[-1]:.1f}")
    print("at s: " + ", ".join(f"{t:.2f} ({g:.0f} ms)" for t, g in gaps[:40]))
' "$gap_ms" "$secs" "$cpu"
