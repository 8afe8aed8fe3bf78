#!/usr/bin/env python3
"""Summarize a kosoku / Autobahn|Testsuite fuzzingclient report directory.

    summarize.py REPORT_DIR [--baseline FILE] [--size-cap BYTES]

Reads REPORT_DIR/index.json (and the per-case JSON files it names), prints per-section
counts of the two verdicts Autobahn gives every case, lists every case that is not OK/OK with
the reasons the report gives, and writes the same text to REPORT_DIR/summary.md (plus the
counts to REPORT_DIR/summary.json).

Verdicts, as Autobahn defines them:
  behavior       OK | NON-STRICT | INFORMATIONAL | UNIMPLEMENTED | FAILED (kosoku: also ERROR)
  behaviorClose  OK | INFORMATIONAL | UNCLEAN | WRONG CODE | FAILED | FAILED BY CLIENT

Exit status: 1 when any case FAILED, i.e. its behavior is FAILED/ERROR or its closing
handshake verdict is anything other than OK or INFORMATIONAL (UNCLEAN and WRONG CODE count as
failures here: they are MUST-level violations of RFC 6455's closing handshake); 0 otherwise.
UNIMPLEMENTED (permessage-deflate, sections 12 and 13, when the server does not negotiate it)
and NON-STRICT are reported but are not failures. A case that FAILED only because the server
closed it with 1009 on a message larger than --size-cap is still a failure, but is listed
separately. --baseline FILE compares with a committed baseline (informational only).
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
CLOSES = ["OK", "INFORMATIONAL", "UNCLEAN", "WRONG CODE", "FAILED", "FAILED BY CLIENT"]
OK_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
OK_CLOSE = {"OK", "INFORMATIONAL"}


def case_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def failed(v: dict) -> bool:
    return v["behavior"] not in OK_BEHAVIOR or v["behaviorClose"] not in OK_CLOSE


def load(report_dir: str) -> tuple[str, dict[str, dict]]:
    with open(os.path.join(report_dir, "index.json")) as f:
        index = json.load(f)
    if len(index) != 1:
        raise SystemExit(f"expected one agent in index.json, found {sorted(index)}")
    (agent, cases), = index.items()
    for case_id, v in cases.items():
        path = os.path.join(report_dir, v["reportfile"])
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError:
            d = {}
        v["result"] = d.get("result", "")
        v["resultClose"] = d.get("resultClose", "")
        v["remoteCloseReason"] = d.get("remoteCloseReason")
        v["description"] = d.get("description", "")
    return agent, dict(sorted(cases.items(), key=lambda kv: case_key(kv[0])))


def table(title: str, labels: list[str], counts: dict[str, Counter]) -> list[str]:
    extra = sorted({k for c in counts.values() for k in c} - set(labels))
    labels = labels + extra
    out = [f"{title}", "", "| section | " + " | ".join(labels) + " | total |",
           "|---" * (len(labels) + 2) + "|"]
    total = Counter()
    for sec in sorted(counts, key=int):
        c = counts[sec]
        total.update(c)
        out.append(f"| {sec} | " + " | ".join(str(c.get(l, 0)) for l in labels)
                   + f" | {sum(c.values())} |")
    out.append("| **all** | " + " | ".join(str(total.get(l, 0)) for l in labels)
               + f" | {sum(total.values())} |")
    return out + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report_dir")
    ap.add_argument("--baseline", help="baseline JSON (conformance/baseline-*.json)")
    ap.add_argument("--size-cap", type=int, default=None,
                    help="server's max message size in bytes, to tell size-cap failures apart")
    ap.add_argument("--label", default=None, help="heading for the summary")
    args = ap.parse_args()

    agent, cases = load(args.report_dir)
    by_b: dict[str, Counter] = defaultdict(Counter)
    by_c: dict[str, Counter] = defaultdict(Counter)
    for case_id, v in cases.items():
        sec = case_id.split(".")[0]
        by_b[sec][v["behavior"]] += 1
        by_c[sec][v["behaviorClose"]] += 1

    lines = [f"# Autobahn summary: {args.label or agent}", "",
             f"{len(cases)} cases; report: {os.path.abspath(args.report_dir)}/index.html", ""]
    lines += table("## behavior (per section)", BEHAVIORS, by_b)
    lines += table("## behaviorClose (per section)", CLOSES, by_c)

    fails = [k for k, v in cases.items() if failed(v)]
    size_cap = [k for k in fails
                if args.size_cap and cases[k]["remoteCloseCode"] == 1009]
    genuine = [k for k in fails if k not in size_cap]

    def row(k: str) -> str:
        v = cases[k]
        code = v["remoteCloseCode"]
        reason = v["remoteCloseReason"]
        sent = "none" if code is None else f"{code}" + (f" \"{reason}\"" if reason else "")
        return (f"| {k} | {v['behavior']} | {v['behaviorClose']} | {sent} | "
                f"{v['result']} | {v['resultClose']} |")

    hdr = ["| case | behavior | behaviorClose | server's close frame | result | resultClose |",
           "|---|---|---|---|---|---|"]
    non_ok = [k for k, v in cases.items() if (v["behavior"], v["behaviorClose"]) != ("OK", "OK")]
    lines += [f"## Not OK/OK: {len(non_ok)} cases", ""]
    # Group identical (behavior, behaviorClose, close, result-kind) rows to keep it readable.
    groups: dict[tuple, list[str]] = defaultdict(list)
    for k in non_ok:
        v = cases[k]
        groups[(v["behavior"], v["behaviorClose"], v["remoteCloseCode"],
                v["remoteCloseReason"], v["resultClose"])].append(k)
    lines += ["| cases | behavior | behaviorClose | server's close frame | resultClose | first result |",
              "|---|---|---|---|---|---|"]
    for (b, c, code, reason, rc), ks in groups.items():
        sent = "none" if code is None else f"{code}" + (f" \"{reason}\"" if reason else "")
        lines.append(f"| {compact(ks)} ({len(ks)}) | {b} | {c} | {sent} | {rc} | "
                     f"{cases[ks[0]]['result']} |")
    lines.append("")

    if size_cap:
        lines += [f"## FAILED only because of the size cap ({args.size_cap} bytes): "
                  f"{len(size_cap)} cases", ""] + hdr + [row(k) for k in size_cap] + [""]
    lines += [f"## FAILED: {len(genuine)} cases"
              + (" (besides the size cap)" if size_cap else ""), ""]
    if genuine:
        lines.append(f"cases: {compact(genuine)}")
    lines.append("")

    if args.baseline:
        with open(args.baseline) as f:
            base = json.load(f)["cases"]
        verdict_diff: dict[tuple, list[str]] = defaultdict(list)
        code_diff: dict[tuple, list[str]] = defaultdict(list)
        for k, v in cases.items():
            b = base.get(k)
            if b is None:
                verdict_diff[("not in baseline", "")].append(k)
            elif [v["behavior"], v["behaviorClose"]] != b[:2]:
                verdict_diff[(f"{b[0]} / {b[1]}", f"{v['behavior']} / {v['behaviorClose']}")].append(k)
            elif v["remoteCloseCode"] != b[2]:
                code_diff[(b[2], v["remoteCloseCode"])].append(k)
        missing = sorted(set(base) - set(cases), key=case_key)
        n = sum(len(ks) for ks in verdict_diff.values())
        lines += [f"## Verdicts that differ from {os.path.basename(args.baseline)}: {n} cases"
                  + (f" ({len(missing)} baseline cases not run)" if missing else ""), ""]
        if verdict_diff:
            lines += ["| cases | baseline behavior / close | this run |", "|---|---|---|"]
            for (b, mine), ks in verdict_diff.items():
                lines.append(f"| {compact(ks)} ({len(ks)}) | {b} | {mine} |")
            lines.append("")
        n = sum(len(ks) for ks in code_diff.values())
        lines += [f"Same verdicts, different close code from the server: {n} cases", ""]
        if code_diff:
            lines += ["| cases | baseline code | this run |", "|---|---|---|"]
            for (b, mine), ks in code_diff.items():
                lines.append(f"| {compact(ks)} ({len(ks)}) | {b if b is not None else 'none'} | "
                             f"{mine if mine is not None else 'none'} |")
        lines.append("")

    verdict = ("RESULT: FAILED" if fails else "RESULT: no FAILED case") + \
        f" — {len(fails)} failed of {len(cases)}" + \
        (f" ({len(size_cap)} by the size cap)" if size_cap else "")
    lines += [verdict, ""]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.report_dir, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.report_dir, "summary.json"), "w") as f:
        json.dump({"agent": agent, "cases": len(cases),
                   "behavior": {s: dict(c) for s, c in by_b.items()},
                   "behaviorClose": {s: dict(c) for s, c in by_c.items()},
                   "failed": fails, "failed_size_cap": size_cap}, f, indent=1)
    return 1 if fails else 0


def compact(ids: list[str]) -> str:
    """1.1.1, 1.1.2, 1.1.3, 2.1 -> '1.1.1–1.1.3, 2.1' (runs of consecutive last components)."""
    ids = sorted(ids, key=case_key)
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        pre, last = ids[i].rsplit(".", 1) if "." in ids[i] else ("", ids[i])
        while j + 1 < len(ids):
            p2, l2 = ids[j + 1].rsplit(".", 1)
            if p2 == pre and int(l2) == int(ids[j].rsplit(".", 1)[1]) + 1:
                j += 1
            else:
                break
        out.append(ids[i] if i == j else f"{ids[i]}–{ids[j]}")
        i = j + 1
    return ", ".join(out)


if __name__ == "__main__":
    sys.exit(main())
