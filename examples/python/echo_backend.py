"""A Switchyard backend in Python with the stock NATS client (nats-py): no Switchyard code.

It consumes a route's inbound subjects (<prefix>.in.<topic>.p<N>, one per partition), reads
the envelope from the headers, and answers each client frame with "py:" + the frame, straight
to the node holding the session (the sy-reply subject), keyed by the sy-session header.

Run with:
    pip install -r examples/python/requirements.txt
    python3 examples/python/echo_backend.py --nats nats://127.0.0.1:4222 --topic echo

Per-session order: one process subscribing to all partitions sees each session's records in
order. To spread a pool over several processes without losing that order, give each process
its own partitions (--partitions 0,1,2,...): never put several processes in one queue group on
the same partition.
"""

import argparse
import asyncio
import signal

import nats


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--prefix", default="sy")
    ap.add_argument("--topic", default="echo")
    ap.add_argument("--partitions", default="", help="comma-separated partition numbers (default: all)")
    args = ap.parse_args()

    nc = await nats.connect(args.nats, name="python-echo")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def on_msg(msg) -> None:
        h = msg.headers or {}
        if h.get("sy-kind") != "frame":
            return  # connect / disconnect: a real backend would track sessions here
        reply_to = h.get("sy-reply") or f"{args.prefix}.out"
        await nc.publish(
            reply_to,
            b"py:" + msg.data,
            headers={
                "sy-session": h["sy-session"],
                "sy-kind": "deliver",
                "sy-opcode": h.get("sy-opcode", "text"),
            },
        )

    base = f"{args.prefix}.in.{args.topic}"
    subjects = [f"{base}.p{p}" for p in args.partitions.split(",")] if args.partitions else [f"{base}.*"]
    for s in subjects:
        await nc.subscribe(s, cb=on_msg)
    await nc.flush()
    print(f"python echo backend ready on {', '.join(subjects)}", flush=True)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
