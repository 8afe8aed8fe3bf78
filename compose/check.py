"""Checks compose/ as far as a machine without a Docker engine can: every file parses, every
reference resolves, and the dashboard queries only metrics Switchyard declares.

Run with: python3 compose/check.py   (the test suite runs it)
"""
import json
import pathlib
import re
import sys

import yaml

here = pathlib.Path(__file__).parent
root = here.parent
errors = []

compose = yaml.safe_load((here / "docker-compose.yml").read_text())
services = compose["services"]
for name in ["kafka", "nats", "edge1", "edge2", "router", "demo", "prometheus", "grafana"]:
    if name not in services:
        errors.append(f"service {name} missing")
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        errors.append(f"{name}: neither image nor build")
    deps = svc.get("depends_on", {})
    for dep in (deps if isinstance(deps, (list, dict)) else []):
        if dep not in services:
            errors.append(f"{name}: depends_on unknown service {dep}")
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("./") and not (here / src).exists():
            errors.append(f"{name}: volume source {src} does not exist")
        elif not src.startswith(("./", "/")) and src not in (compose.get("volumes") or {}):
            errors.append(f"{name}: named volume {src} not declared")
    build = svc.get("build")
    if build:
        ctx = (here / build["context"]).resolve()
        if not (ctx / build["dockerfile"]).exists():
            errors.append(f"{name}: Dockerfile {build['dockerfile']} not found in {ctx}")
    cmd = svc.get("command")
    if svc.get("image") == "switchyard:local" and cmd and cmd[0] not in ("edge", "router", "demo", "standalone"):
        errors.append(f"{name}: unknown switchyard subcommand {cmd[0]}")

dockerfile = (here / "Dockerfile").read_text()
if not dockerfile.lstrip().startswith(("FROM", "#")) or "ENTRYPOINT" not in dockerfile:
    errors.append("Dockerfile: no FROM/ENTRYPOINT")

prom = yaml.safe_load((here / "prometheus.yml").read_text())
targets = [t for sc in prom["scrape_configs"] for c in sc["static_configs"] for t in c["targets"]]
for t in targets:
    host = t.split(":")[0]
    if host not in services:
        errors.append(f"prometheus target {t}: no such service")
for node in ["edge1", "edge2", "router", "demo"]:
    if not any(t.startswith(node + ":") for t in targets):
        errors.append(f"prometheus does not scrape {node}")

for f in (here / "grafana/provisioning").rglob("*.yml"):
    yaml.safe_load(f.read_text())
dash = json.loads((here / "grafana/dashboards/switchyard.json").read_text())
# Each crate declares its metrics in one module.
declared = set()
for f in ["edge/src/metrics.rs", "bus/src/metrics.rs", "router/src/metrics.rs"]:
    declared |= set(re.findall(r'"(switchyard_[a-z_]+)"', (root / f).read_text()))

# The broker compose runs is the one the tests run (scripts/kafka).
kafka_version = re.search(r"^KAFKA_VERSION=(\S+)", (root / "scripts/kafka").read_text(), re.M).group(1)
if services["kafka"]["image"] != f"apache/kafka:{kafka_version}":
    errors.append(f"kafka image {services['kafka']['image']} is not the tested apache/kafka:{kafka_version}")
for p in dash["panels"]:
    for t in p["targets"]:
        for m in re.findall(r"switchyard_[a-z_]+", t["expr"]):
            base = re.sub(r"_bucket$", "", m)
            if base not in declared:
                errors.append(f"dashboard panel {p['title']!r} queries undeclared metric {m}")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"compose ok: {len(services)} services, {len(targets)} scrape targets, {len(dash['panels'])} dashboard panels")
