"""Chat room backend in Python with the stock nats-py client: no Switchyard code.

It reads the chat route's frames from the inbound subjects (<prefix>.in.chat.p<N>, as a queue
group, so several copies share the work), and for each {"room": R, "text": T} publishes
{"from": ..., "text": T, "ts": ...} to the channel chat.<R> (subject <prefix>.ch.chat.<R>),
which every subscribed browser gets through the gateway, with history for late joiners.
It also serves the page (index.html and the SDK build) on --http.

Run with: python3 examples/chat/backend.py [--nats nats://127.0.0.1:4222] [--http 127.0.0.1:8000]
(pip install nats-py; the gateway must run on the same NATS with examples/chat/routes.toml).
"""

import argparse
import asyncio
import functools
import http.server
import json
import re
import threading
import time
from pathlib import Path

import nats

HERE = Path(__file__).resolve().parent
SDK = HERE.parent.parent / "clients" / "js" / "dist" / "switchyard.min.js"
ROOM = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class Page(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        files = {"/": (HERE / "index.html", "text/html"), "/switchyard.js": (SDK, "text/javascript")}
        path = self.path.split("?")[0]
        if path not in files:
            self.send_error(404)
            return
        f, kind = files[path]
        body = f.read_bytes()
        self.send_response(200)
        self.send_header("content-type", f"{kind}; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--prefix", default="sy")
    ap.add_argument("--http", default="127.0.0.1:8000")
    a = ap.parse_args()
    host, port = a.http.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    nc = await nats.connect(a.nats)

    async def on_frame(msg):
        h = msg.headers or {}
        if h.get("sy-kind") != "frame":
            return  # connect, disconnect, resume: nothing to do for a chat room
        try:
            m = json.loads(msg.data)
            room, text = str(m["room"]), str(m["text"])[:500]
        except (ValueError, KeyError, TypeError):
            return
        if not ROOM.match(room):
            return
        who = h.get("sy-sub") or h.get("sy-session", "?")[-6:]
        out = {"from": who, "text": text, "ts": int(time.time() * 1000)}
        await nc.publish(f"{a.prefix}.ch.chat.{room}", json.dumps(out).encode())

    await nc.subscribe(f"{a.prefix}.in.chat.*", queue="chat-backend", cb=on_frame)
    print(f"chat backend on {a.nats}; page on http://{a.http}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
