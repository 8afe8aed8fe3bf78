#!/usr/bin/env bash
# Instructions per delivery of the channel fan-out path (the callgrind target in BENCHMARKS.md:
# at most 300 per delivery and 0.25x the baseline's), measured with callgrind:
# Switchyard's edge (memory bus -> channel pump -> frame encoded once -> write to each
# subscriber's loopback socket) versus the naive baseline (tokio broadcast -> per-receiver task
# -> tokio-tungstenite send). User-space instructions only: callgrind does not see the kernel.
#
#   bench/callgrind.sh                          # 1,000 subscribers x 200 messages, batches 32 and 1
#   N=5000 M=50 BATCHES="32" bench/callgrind.sh # other counts
#
# A batch is the number of messages published before the fan-out runs: with 32, each
# subscriber's frames are coalesced into one vectored write; with 1 every delivery is its own
# write. Only the measured publish loop is counted (--toggle-collect on measured_*); set-up and
# a warm-up are not. Prints one line per mode and batch, and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
M=${M:-200}
BATCHES=${BATCHES:-"32 1"}
# Open files: N subscriber sockets and their server ends, with room for N up to 9,000 or so.
ulimit -n 20000
cargo build --release --quiet -p fanout-callgrind
out=$(mktemp -d)
for batch in $BATCHES; do
  declare -A ipd
  for mode in switchyard baseline; do
    f="$out/$mode.b$batch"
    valgrind --tool=callgrind --callgrind-out-file="$f.out" \
      --toggle-collect="*measured_${mode}*" \
      target/release/fanout-callgrind --mode "$mode" --subscribers "$N" --messages "$M" --batch "$batch" \
      >"$f.log" 2>&1 || { cat "$f.log"; exit 1; }
    ir=$(awk '/^summary:/ {print $2}' "$f.out")
    ipd[$mode]=$(awk -v ir="$ir" -v d="$((N * M))" 'BEGIN {printf "%.1f", ir / d}')
    echo "batch $batch: $mode: $ir instructions / $((N * M)) deliveries = ${ipd[$mode]} per delivery"
  done
  awk -v a="${ipd[switchyard]}" -v b="${ipd[baseline]}" -v batch="$batch" \
    'BEGIN {printf "batch %s: switchyard / baseline = %.2f (target: <= 300 per delivery and <= 0.25x)\n", batch, a / b}'
done
echo "profiles: $out/*.out (callgrind_annotate --inclusive=no FILE)"
