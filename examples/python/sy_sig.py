"""Verify Switchyard's edge signature (`sy-sig`) on an inbound record (docs/protocol.md).

    from sy_sig import verify
    verify(key, [(name, value), ...], payload)   # -> bool

As a command (used by the test suite): reads {"key_hex", "headers": [[name, value], ...],
"payload_b64"} as JSON on stdin; prints "ok" and exits 0, or prints "bad" and exits 1.
"""

import base64
import hashlib
import hmac
import json
import sys

SIGNED = ["sy-v", "sy-session", "sy-seq", "sy-kind", "sy-node", "sy-route", "sy-opcode",
          "sy-sub", "sy-claims", "sy-ts", "sy-code", "sy-reason", "sy-reply", "sy-inbound",
          "traceparent", "tracestate"]


def verify(key: bytes, headers: list[tuple[str, str]], payload: bytes) -> bool:
    """headers: the record's (name, value) pairs as the client library returns them."""
    seen: dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if name in seen and (name in SIGNED or name == "sy-sig"):
            return False  # a duplicated signed header: refuse
        seen[name] = value
    text = b"v1\n" + b"".join(f"{n}={seen.get(n, '')}\n".encode() for n in SIGNED) + payload
    want = "v1=" + hmac.new(key, text, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, seen.get("sy-sig", ""))


if __name__ == "__main__":
    rec = json.load(sys.stdin)
    good = verify(bytes.fromhex(rec["key_hex"]), [tuple(h) for h in rec["headers"]],
                  base64.b64decode(rec["payload_b64"]))
    print("ok" if good else "bad")
    sys.exit(0 if good else 1)
