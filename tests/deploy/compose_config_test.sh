#!/usr/bin/env bash
# docker-compose accepts deploy/docker-compose.yml (no Docker engine needed for `config`), the
# resolved file has the four services and the GPU reservation, and promtool accepts the
# Prometheus configuration.
# Usage: compose_config_test.sh DEPLOY_DIR
set -euo pipefail
deploy=$1
fail() { echo "FAIL: $*"; exit 1; }

docker-compose -f "$deploy/docker-compose.yml" config -q || fail "docker-compose rejected the file"
resolved=$(docker-compose -f "$deploy/docker-compose.yml" config)
services=$(docker-compose -f "$deploy/docker-compose.yml" config --services | sort | tr '\n' ' ')
[ "$services" = "gpu-worker grafana param-server prometheus " ] || fail "services: $services"
python3 - "$resolved" <<'PY' || fail "the resolved compose file lacks a required setting"
import sys, yaml
c = yaml.safe_load(sys.argv[1])
s = c["services"]
devices = s["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
assert "healthcheck" in s["param-server"], "param-server has no healthcheck"
assert s["gpu-worker"]["depends_on"]["param-server"]["condition"] == "service_healthy"
for svc, path in [("param-server", "/var/lib/meft/checkpoints"), ("gpu-worker", "/var/lib/meft/runs")]:
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in s[svc]["volumes"]]
    assert path in targets, (svc, targets)
PY
promtool check config "$deploy/prometheus/prometheus.yml" >/dev/null ||
  fail "promtool rejected prometheus.yml"
echo "compose_config_test: docker-compose and promtool accept deploy/"
