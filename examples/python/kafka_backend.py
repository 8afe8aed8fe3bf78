"""A Switchyard backend in Python with the stock Kafka client (confluent-kafka): no
Switchyard code.

It consumes a route's inbound topic (<prefix>.in.<topic>) as a consumer group, reads the
envelope from the headers, and answers each client frame with "kafka:" + the frame on the
outbound topic (<prefix>.out), keyed by session. A router delivers it to the right socket.
Kafka keeps each session in one partition, so a group of these processes keeps per-session
order.

Run with:
    pip install -r examples/python/requirements.txt
    python3 examples/python/kafka_backend.py --brokers 127.0.0.1:9092 --topic echo
"""

import argparse
import signal

from confluent_kafka import Consumer, Producer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--prefix", default="sy")
    ap.add_argument("--topic", default="echo")
    ap.add_argument("--group", default="python-backend")
    args = ap.parse_args()

    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    consumer = Consumer({
        "bootstrap.servers": args.brokers,
        "group.id": f"{args.prefix}-{args.group}",
        # A new group starts at the beginning: frames that arrived before the backend first
        # started are answered, not skipped.
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 20,
        "topic.metadata.refresh.interval.ms": 2000,
    })
    producer = Producer({
        "bootstrap.servers": args.brokers,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",  # the same partitioner as Java clients and Switchyard
        "linger.ms": 1,
    })
    inbound = f"{args.prefix}.in.{args.topic}"
    ready = False

    def on_assign(c, partitions):
        nonlocal ready
        if not ready:
            ready = True
            print(f"python kafka backend ready on {inbound}", flush=True)

    consumer.subscribe([inbound], on_assign=on_assign)
    while running:
        msg = consumer.poll(0.1)
        if msg is None or msg.error():
            continue
        headers = {k: v.decode() for k, v in (msg.headers() or [])}
        if headers.get("sy-kind") != "frame":
            continue  # connect / disconnect: a real backend would track sessions here
        producer.produce(
            f"{args.prefix}.out",
            key=msg.key(),
            value=b"kafka:" + msg.value(),
            headers=[
                ("sy-session", headers["sy-session"]),
                ("sy-kind", "deliver"),
                ("sy-opcode", headers.get("sy-opcode", "text")),
            ],
        )
        producer.poll(0)
    producer.flush(10)
    consumer.close()


if __name__ == "__main__":
    main()
