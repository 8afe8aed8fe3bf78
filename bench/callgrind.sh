#!/usr/bin/env bash
# Instructions per delivery of the in-memory channel fan-out path (issue 5), measured with
# callgrind: Switchyard's edge (memory bus -> channel pump -> per-session queue -> writer
# dequeue) versus the naive baseline (tokio broadcast -> per-receiver task). No sockets.
#
#   bench/callgrind.sh                 # 1,000 subscribers x 200 messages
#   N=10000 M=50 bench/callgrind.sh    # other counts
#
# Only the measured publish loop is counted (--toggle-collect on measured_*); set-up and a
# warm-up batch are not. Prints one line per mode and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
M=${M:-200}
cargo build --release --quiet -p fanout-callgrind
out=$(mktemp -d)
declare -A ipd
for mode in switchyard baseline; do
  valgrind --tool=callgrind --callgrind-out-file="$out/$mode.out" \
    --toggle-collect="*measured_${mode}*" \
    target/release/fanout-callgrind --mode "$mode" --subscribers "$N" --messages "$M" \
    >"$out/$mode.log" 2>&1 || { cat "$out/$mode.log"; exit 1; }
  ir=$(awk '/^summary:/ {print $2}' "$out/$mode.out")
  ipd[$mode]=$(awk -v ir="$ir" -v d="$((N * M))" 'BEGIN {printf "%.1f", ir / d}')
  echo "$mode: $ir instructions / $((N * M)) deliveries = ${ipd[$mode]} per delivery"
done
awk -v a="${ipd[switchyard]}" -v b="${ipd[baseline]}" \
  'BEGIN {printf "switchyard / baseline = %.2f (target: <= 300 per delivery and <= 0.25x)\n", a / b}'
echo "profiles: $out/{switchyard,baseline}.out (callgrind_annotate --inclusive=no FILE)"
