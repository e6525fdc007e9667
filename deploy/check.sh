#!/usr/bin/env bash
# Checks the files in deploy/ without installing them: everything happens in a temporary
# directory, nothing under /etc is written, no service is started or reloaded.
#
#   deploy/check.sh               # from anywhere
#   deploy/check.sh --no-install  # never apt-get install nginx/openssl (fail instead)
#
# What it checks:
#   1. nginx site: `nginx -t` on a throwaway nginx.conf that includes a copy of the site,
#      with a self-signed certificate made here (openssl) in place of the real paths.
#      If nginx is missing and we are root on Debian/Ubuntu, it is installed with
#      `apt-get install -y nginx` (the only change this script may make to the system;
#      note that Debian's package starts nginx on port 80 where services can start).
#   2. systemd unit: `systemd-analyze verify` (skipped if systemd-analyze is missing).
#   3. Supervisor program: parsed by Supervisor's own config loader (skipped without it).
#   4. gateway.example.toml: parses as TOML; and if a step3-gateway binary is found
#      ($GATEWAY_BIN, target/release, target/debug, or PATH), the gateway really starts on
#      it (127.0.0.1, a free port, a temp data dir), the Dockerfile's HEALTHCHECK command
#      passes against it, and it stops cleanly on SIGTERM.
#   5. Grafana dashboard: JSON parses, every query uses only the gateway's metric names,
#      and (with promtool) every query is valid PromQL.
#   6. prometheus.yml: `promtool check config`, or a YAML parse without promtool.
#   7. Dockerfile: hadolint if installed, else a static check of the required instructions.
#   8. compose/ (several replicas): `docker compose config` where Compose is installed;
#      the YAML parsed and checked to fit together (2 shared-store gateways with a /data
#      each, the files it mounts, Prometheus targets); `nginx -t` of its site; promtool.
#   9. k8s/: every manifest parsed and checked to fit together (Deployment of 2 replicas,
#      Service selecting them, readiness on /health, Secret keys the pods read);
#      `kubectl apply --dry-run=server` only where a cluster answers.
# Ends with "check: N passed, N failed, N skipped"; exits 1 if anything failed.
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$DEPLOY")"
INSTALL=1
[[ "${1:-}" == "--no-install" ]] && INSTALL=0

T="$(mktemp -d "${TMPDIR:-/tmp}/step3gw-deploy-check.XXXXXX")"
GW_PID=""
cleanup() {
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

PASSED=0 FAILED=0 SKIPPED=0
pass() { echo "PASS  $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL  $*"; FAILED=$((FAILED + 1)); }
skip() { echo "SKIP  $*"; SKIPPED=$((SKIPPED + 1)); }
indent() { sed 's/^/      /'; }

PY=""
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
done

apt_install() {  # apt_install PACKAGE...: only as root, only with apt-get, unless --no-install
    [[ $INSTALL == 1 && $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1 || return 1
    echo "      installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$T/apt.log" 2>&1 \
        || { apt-get update -qq >>"$T/apt.log" 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$T/apt.log" 2>&1; }
}

# ------------------------------------------------------------------ 1. nginx
echo "== nginx site (deploy/nginx/step3-gateway.conf)"
NGINX="$(command -v nginx || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; })"
if [[ -z "$NGINX" ]]; then
    apt_install nginx
    NGINX="$(command -v nginx || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; })"
fi
command -v openssl >/dev/null 2>&1 || apt_install openssl
if [[ -z "$NGINX" ]]; then
    fail "nginx -t: nginx is not installed (apt-get install -y nginx)"
elif ! command -v openssl >/dev/null 2>&1; then
    fail "nginx -t: openssl is not installed (needed for the throwaway certificate)"
else
    mkdir -p "$T/nginx/logs"
    # A self-signed certificate, valid one day, only for nginx -t to load.
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=gateway.example.com" \
        -keyout "$T/nginx/test.key" -out "$T/nginx/test.crt" >/dev/null 2>&1
    # A copy of the site with the certificate placeholders and log paths pointed into $T.
    sed -E \
        -e "s#^([[:space:]]*ssl_certificate)[[:space:]]+[^;]+;#\1 $T/nginx/test.crt;#" \
        -e "s#^([[:space:]]*ssl_certificate_key)[[:space:]]+[^;]+;#\1 $T/nginx/test.key;#" \
        -e "s#^([[:space:]]*access_log)[[:space:]]+[^;]+;#\1 $T/nginx/logs/access.log;#" \
        -e "s#^([[:space:]]*error_log)[[:space:]]+[^;]+;#\1 $T/nginx/logs/error.log;#" \
        "$DEPLOY/nginx/step3-gateway.conf" >"$T/nginx/step3-gateway.conf"
    # The smallest nginx.conf that includes the site in the http {} context, as
    # /etc/nginx/nginx.conf includes sites-enabled/*; every path in $T.
    cat >"$T/nginx/nginx.conf" <<EOF
pid $T/nginx/nginx.pid;
error_log $T/nginx/logs/error.log;
events { worker_connections 1024; }
http {
    access_log $T/nginx/logs/access.log;
    client_body_temp_path $T/nginx/client_body;
    proxy_temp_path $T/nginx/proxy;
    fastcgi_temp_path $T/nginx/fastcgi;
    uwsgi_temp_path $T/nginx/uwsgi;
    scgi_temp_path $T/nginx/scgi;
    include $T/nginx/step3-gateway.conf;
}
EOF
    # -e (nginx >= 1.19.5): the error log nginx opens before reading the config, also in $T.
    if "$NGINX" -t -p "$T/nginx/" -e "$T/nginx/logs/error.log" -c "$T/nginx/nginx.conf" \
        >"$T/nginx/t.out" 2>&1; then
        indent <"$T/nginx/t.out"
        pass "nginx -t ($("$NGINX" -v 2>&1 | sed 's#.*/##'))"
    else
        indent <"$T/nginx/t.out"
        fail "nginx -t"
    fi
fi

# ------------------------------------------------------------------ 2. systemd
echo "== systemd unit (deploy/systemd/step3-gateway.service)"
if command -v systemd-analyze >/dev/null 2>&1; then
    mkdir -p "$T/systemd"
    # `systemd-analyze verify` refuses a unit whose ExecStart binary does not exist, and
    # /usr/local/bin/step3-gateway is not installed here. So a temporary copy of the unit
    # runs /bin/true instead (same arguments, which /bin/true ignores); everything else
    # in the unit is checked as written.
    sed 's#^ExecStart=/usr/local/bin/step3-gateway#ExecStart=/bin/true#' \
        "$DEPLOY/systemd/step3-gateway.service" >"$T/systemd/step3-gateway.service"
    # verify exits 0 on some problems (e.g. an unknown key is "ignored"): any output fails.
    if systemd-analyze verify "$T/systemd/step3-gateway.service" >"$T/systemd/out" 2>&1 \
        && [[ ! -s "$T/systemd/out" ]]; then
        pass "systemd-analyze verify ($(systemd-analyze --version | head -n 1))"
    else
        indent <"$T/systemd/out"
        fail "systemd-analyze verify"
    fi
else
    skip "systemd-analyze verify: systemd-analyze not found"
fi

# ------------------------------------------------------------------ 3. Supervisor
echo "== Supervisor program (deploy/supervisor/step3-gateway.conf)"
SUPPY=""
for candidate in /usr/bin/python3 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import supervisor.options' 2>/dev/null; then
        SUPPY="$candidate"; break
    fi
done
if [[ -n "$SUPPY" ]]; then
    mkdir -p "$T/supervisor"
    # Supervisor refuses user=step3gw unless that user exists: the copy runs as whoever
    # runs this check. Everything else is parsed as written.
    sed "s/^user=.*/user=$(id -un)/" "$DEPLOY/supervisor/step3-gateway.conf" \
        >"$T/supervisor/step3-gateway.conf"
    cat >"$T/supervisor/supervisord.conf" <<EOF
[supervisord]
logfile=$T/supervisor/supervisord.log
pidfile=$T/supervisor/supervisord.pid
[include]
files=$T/supervisor/step3-gateway.conf
EOF
    if "$SUPPY" - "$T/supervisor/supervisord.conf" >"$T/supervisor/out" 2>&1 <<'EOF'
import sys
from supervisor.options import ServerOptions
options = ServerOptions()
options.realize(args=["-c", sys.argv[1]])   # exits non-zero with a message on errors
(group,) = options.process_group_configs
(p,) = group.process_configs
assert p.name == "step3-gateway", p.name
assert p.stopsignal == 15, "stopsignal must be TERM"
assert p.stopwaitsecs > 30, "stopwaitsecs must exceed server.shutdown_grace_secs (30)"
assert p.stopasgroup and p.killasgroup, "stopasgroup/killasgroup"
assert "RUST_LOG" in (p.environment or {}), "environment= has no RUST_LOG"
print(f"      command={p.command}")
print(f"      stopsignal=TERM stopwaitsecs={p.stopwaitsecs} env={sorted(p.environment)}")
EOF
    then
        cat "$T/supervisor/out"
        pass "supervisor config loads"
    else
        indent <"$T/supervisor/out"
        fail "supervisor config"
    fi
else
    skip "supervisor config: the supervisor Python package is not installed"
fi

# ------------------------------------------------------------------ 4. gateway.example.toml
echo "== gateway config (deploy/gateway.example.toml) and the Docker health check"
if [[ -n "$PY" ]] && "$PY" -c 'import tomllib' 2>/dev/null; then
    if "$PY" -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' \
        "$DEPLOY/gateway.example.toml" 2>"$T/toml.err"; then
        pass "gateway.example.toml is valid TOML"
    else
        indent <"$T/toml.err"; fail "gateway.example.toml is not valid TOML"
    fi
else
    skip "TOML syntax: no python3 >= 3.11 (tomllib)"
fi

GW_BIN=""
for candidate in "${GATEWAY_BIN:-}" "$ROOT/target/release/step3-gateway" \
    "$ROOT/target/debug/step3-gateway" "$(command -v step3-gateway 2>/dev/null)"; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then GW_BIN="$candidate"; break; fi
done
if [[ -n "$GW_BIN" ]]; then
    # The gateway loads the example exactly as in production (unknown keys are errors);
    # only the address and data dir are overridden by flags, as the units do.
    # Its first start prints an admin token: it stays in $T, deleted on exit.
    # STEP3GW_* variables of this shell are dropped, so the file is tested as written
    # (that is also why the binary is named by GATEWAY_BIN, not a STEP3GW_ variable:
    # the gateway refuses unknown STEP3GW_ keys).
    unset_env=()
    for name in $(env | grep -oE '^STEP3GW_[A-Za-z0-9_]*'); do unset_env+=(-u "$name"); done
    env "${unset_env[@]}" "$GW_BIN" serve --config "$DEPLOY/gateway.example.toml" --data-dir "$T/gw-data" \
        --listen 127.0.0.1:0 >"$T/gw.out" 2>"$T/gw.err" &
    GW_PID=$!
    ADDR=""
    for _ in $(seq 1 100); do
        ADDR="$(grep -oE '"addr":"127\.0\.0\.1:[0-9]+"|listening[^0-9]*127\.0\.0\.1:[0-9]+' "$T/gw.err" \
            | grep -oE '127\.0\.0\.1:[0-9]+' | head -n 1)"
        [[ -n "$ADDR" ]] && break
        kill -0 "$GW_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z "$ADDR" ]]; then
        grep -v 'Admin token' "$T/gw.err" | head -n 20 | indent
        fail "step3-gateway does not start with gateway.example.toml ($GW_BIN)"
        kill "$GW_PID" 2>/dev/null; GW_PID=""
    else
        pass "step3-gateway starts with gateway.example.toml ($GW_BIN, on $ADDR)"
        # The Dockerfile's HEALTHCHECK command, run as written but against this port.
        HC="$("${PY:-python3}" - "$DEPLOY/Dockerfile" "${ADDR##*:}" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
m = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
cmd = json.loads(m.group(1))
assert cmd[:2] == ["bash", "-c"], cmd
print(cmd[2].replace("/8080", "/" + sys.argv[2]))
EOF
)"
        if [[ -n "$HC" ]] && bash -c "$HC"; then
            pass "Dockerfile HEALTHCHECK command succeeds against GET /health"
        else
            fail "Dockerfile HEALTHCHECK command against GET /health"
        fi
        kill -TERM "$GW_PID"
        if wait "$GW_PID"; then
            pass "step3-gateway stops cleanly on SIGTERM"
        else
            fail "step3-gateway exit status after SIGTERM"
        fi
        GW_PID=""
    fi
else
    skip "starting the gateway with gateway.example.toml: no step3-gateway binary (build it or set GATEWAY_BIN)"
fi

# ------------------------------------------------------------------ 5. Grafana
echo "== Grafana dashboard (deploy/grafana/step3-gateway.json)"
if [[ -z "$PY" ]]; then
    skip "dashboard: no python3"
elif ! "$PY" -m json.tool "$DEPLOY/grafana/step3-gateway.json" >/dev/null 2>"$T/json.err"; then
    indent <"$T/json.err"; fail "dashboard JSON does not parse"
else
    pass "dashboard JSON parses (python3 -m json.tool)"
    # Every PromQL query (panel targets and variable queries): after removing label
    # matchers, ranges, strings and by/without lists, each identifier left must be a
    # PromQL function/keyword or one of the gateway's metrics. The queries, with the
    # Grafana variables replaced, are also written as recording rules for promtool.
    if "$PY" - "$DEPLOY/grafana/step3-gateway.json" "$T/rules.yml" >"$T/dash.out" 2>&1 <<'EOF'
import json, re, sys

METRICS = {
    "step3gw_requests_total", "step3gw_request_duration_seconds_bucket",
    "step3gw_gateway_overhead_seconds_bucket", "step3gw_time_to_first_token_seconds_bucket",
    "step3gw_tokens_total", "step3gw_images_total", "step3gw_refusals_total",
    "step3gw_in_flight", "step3gw_backend_healthy", "step3gw_backend_in_flight",
    "step3gw_backend_errors_total", "step3gw_store_write_backlog",
}
PROMQL = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "vector", "or", "and", "unless", "by", "without", "on", "ignoring", "label_values",
    "topk", "bottomk", "clamp_min", "clamp_max", "abs", "sort", "sort_desc", "offset",
}
dash = json.load(open(sys.argv[1]))
queries = []  # (where, query)

def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            queries.append((p.get("title", "?"), t["expr"]))
        walk(p.get("panels", []))

walk(dash["panels"])
for v in dash.get("templating", {}).get("list", []):
    if v.get("type") == "query":
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        queries.append(("variable " + v["name"], q))

bad = []
for where, q in queries:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", q)          # strings
    s = re.sub(r"\{[^}]*\}", "", s)                   # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                  # ranges
    s = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", s)
    s = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", s)
    for ident in re.findall(r"[A-Za-z_:][\w:]*", s):
        if ident not in METRICS and ident not in PROMQL:
            bad.append(f"{where}: `{ident}` in {q}")
    if not any(m in q for m in METRICS):
        bad.append(f"{where}: no gateway metric in {q}")

ds_refs = {json.dumps(p.get("datasource")) for p in dash["panels"] if p.get("type") != "row"}
if ds_refs != {json.dumps({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})}:
    bad.append(f"panel datasources are not all ${{DS_PROMETHEUS}}: {ds_refs}")

# Recording rules for promtool: Grafana variables replaced by what Grafana would send.
with open(sys.argv[2], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    n = 0
    for where, q in queries:
        if q.startswith("label_values("):
            continue
        n += 1
        expr = (q.replace("$__rate_interval", "1m").replace("$instance", ".*")
                 .replace("$door", ".*").replace("$model", ".*"))
        f.write(f"      - record: dashboard:query_{n}\n        expr: {json.dumps(expr)}\n")

if bad:
    print("\n".join(bad))
    sys.exit(1)
used = {m for _, q in queries for m in METRICS if re.search(r"\b" + m + r"\b", q)}
print(f"      {len(queries)} queries; metrics used: {len(used)} of {len(METRICS)}")
EOF
    then
        cat "$T/dash.out"
        pass "dashboard queries use only the gateway's metrics"
    else
        indent <"$T/dash.out"; fail "dashboard queries"
    fi
    if command -v promtool >/dev/null 2>&1 && [[ -s "$T/rules.yml" ]]; then
        if promtool check rules "$T/rules.yml" >"$T/promtool-rules.out" 2>&1; then
            pass "dashboard queries are valid PromQL (promtool check rules)"
        else
            indent <"$T/promtool-rules.out"; fail "dashboard queries: promtool check rules"
        fi
    else
        skip "PromQL syntax of the dashboard queries: promtool not installed"
    fi
fi

# ------------------------------------------------------------------ 6. Prometheus
echo "== Prometheus scrape config (deploy/prometheus/prometheus.yml)"
if command -v promtool >/dev/null 2>&1; then
    if promtool check config "$DEPLOY/prometheus/prometheus.yml" >"$T/promtool.out" 2>&1; then
        pass "promtool check config"
    else
        indent <"$T/promtool.out"; fail "promtool check config"
    fi
elif [[ -n "$PY" ]] && "$PY" -c 'import yaml' 2>/dev/null; then
    if "$PY" -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); assert any(j["job_name"] == "step3-gateway" for j in c["scrape_configs"])' \
        "$DEPLOY/prometheus/prometheus.yml" 2>"$T/yaml.err"; then
        pass "prometheus.yml parses (YAML; promtool not installed)"
    else
        indent <"$T/yaml.err"; fail "prometheus.yml"
    fi
else
    skip "prometheus.yml: neither promtool nor PyYAML"
fi

# ------------------------------------------------------------------ 7. Dockerfile
echo "== Dockerfile (deploy/Dockerfile)"
if command -v hadolint >/dev/null 2>&1; then
    if hadolint "$DEPLOY/Dockerfile" >"$T/hadolint.out" 2>&1; then
        pass "hadolint"
    else
        indent <"$T/hadolint.out"; fail "hadolint"
    fi
else
    missing=()
    for pattern in '^FROM rust:.*-bookworm AS builder' 'cargo build --release --locked' \
        '^FROM debian:bookworm-slim' '^USER [0-9]+' '^VOLUME \["/data"\]' '^EXPOSE 8080' \
        '^STOPSIGNAL SIGTERM' '^HEALTHCHECK ' '^ENTRYPOINT \["step3-gateway"\]' '^CMD \["serve"'; do
        grep -qE "$pattern" "$DEPLOY/Dockerfile" || missing+=("$pattern")
    done
    if ((${#missing[@]} == 0)); then
        pass "Dockerfile has its required instructions (static check; no hadolint, no docker build)"
    else
        printf '      missing: %s\n' "${missing[@]}"; fail "Dockerfile static check"
    fi
fi

# ------------------------------------------------------------------ 8. compose (several replicas)
echo "== compose file (deploy/compose/): 2 gateways, nginx, Postgres, Redis, Prometheus, Grafana"
COMPOSE=""
if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then COMPOSE="docker-compose"; fi
if [[ -n "$COMPOSE" ]]; then
    cp "$DEPLOY/compose/env.example" "$T/compose.env"
    if $COMPOSE -f "$DEPLOY/compose/compose.yaml" --env-file "$T/compose.env" config -q \
        >"$T/compose.out" 2>&1; then
        pass "$COMPOSE config"
    else
        indent <"$T/compose.out"; fail "$COMPOSE config"
    fi
else
    skip "docker compose config: Docker Compose is not installed (the YAML is checked below)"
fi
if [[ -n "$PY" ]] && "$PY" -c 'import yaml' 2>/dev/null; then
    if "$PY" - "$DEPLOY/compose" >"$T/compose-yaml.out" 2>&1 <<'EOF'
import sys, pathlib, yaml
d = pathlib.Path(sys.argv[1])
c = yaml.safe_load((d / "compose.yaml").read_text())
s = c["services"]
for name in ["gateway-a", "gateway-b", "nginx", "postgres", "redis", "prometheus", "grafana"]:
    assert name in s, f"no service {name}"
for g in ["gateway-a", "gateway-b"]:
    env = s[g]["environment"]
    assert env["STEP3GW_STORE_BACKEND"] == "shared", g
    for k in ["STEP3GW_STORE_POSTGRES_URL", "STEP3GW_STORE_REDIS_URL", "STEP3GW_ADMIN_TOKEN"]:
        assert k in env, f"{g}: no {k}"
assert s["gateway-a"]["volumes"] != s["gateway-b"]["volumes"], "each replica needs its own /data"
# Files the services mount are there.
for svc in s.values():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            assert (d / src).exists(), f"mounted file missing: {src}"
prom = yaml.safe_load((d / "prometheus.yml").read_text())
targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
assert sorted(targets) == ["gateway-a:8080", "gateway-b:8080"], targets
for f in ["grafana/datasource.yml", "grafana/dashboards.yml"]:
    yaml.safe_load((d / f).read_text())
print("      services:", ", ".join(s))
EOF
    then
        cat "$T/compose-yaml.out"
        pass "compose.yaml, its Prometheus and Grafana files parse and fit together (YAML)"
    else
        indent <"$T/compose-yaml.out"; fail "compose files"
    fi
else
    skip "compose files: PyYAML not installed"
fi
if [[ -n "$NGINX" ]]; then
    # The compose site with the replicas' names as local addresses (nginx -t resolves them).
    mkdir -p "$T/nginx-compose/logs"
    sed -E 's/gateway-[ab]:8080/127.0.0.1:8080/' "$DEPLOY/compose/nginx.conf" >"$T/nginx-compose/site.conf"
    cat >"$T/nginx-compose/nginx.conf" <<EOF
pid $T/nginx-compose/nginx.pid;
error_log $T/nginx-compose/logs/error.log;
events {}
http {
    access_log $T/nginx-compose/logs/access.log;
    client_body_temp_path $T/nginx-compose;
    proxy_temp_path $T/nginx-compose;
    include $T/nginx-compose/site.conf;
}
EOF
    if "$NGINX" -t -p "$T/nginx-compose" -c "$T/nginx-compose/nginx.conf" >"$T/nginx-compose.out" 2>&1; then
        pass "nginx -t (compose site)"
    elif grep -q 'unknown directive "http2"' "$T/nginx-compose.out" &&
        sed -i -E -e '/^[[:space:]]*http2 on;/d' -e 's/listen 8080;/listen 8080 http2;/' \
            "$T/nginx-compose/site.conf" &&
        "$NGINX" -t -p "$T/nginx-compose" -c "$T/nginx-compose/nginx.conf" >"$T/nginx-compose.out" 2>&1; then
        # nginx < 1.25.1 has no `http2 on;`: checked with `listen … http2` in its place.
        pass "nginx -t (compose site; with \`listen 8080 http2\` for this nginx older than 1.25.1)"
    else
        indent <"$T/nginx-compose.out"; fail "nginx -t (compose site)"
    fi
else
    skip "nginx -t (compose site): nginx is not installed"
fi
if command -v promtool >/dev/null 2>&1; then
    if promtool check config "$DEPLOY/compose/prometheus.yml" >"$T/promtool-compose.out" 2>&1; then
        pass "promtool check config (compose)"
    else
        indent <"$T/promtool-compose.out"; fail "promtool check config (compose)"
    fi
else
    skip "promtool check config (compose): promtool not installed"
fi

# ------------------------------------------------------------------ 9. Kubernetes
echo "== Kubernetes manifests (deploy/k8s/)"
if [[ -n "$PY" ]] && "$PY" -c 'import yaml' 2>/dev/null; then
    if "$PY" - "$DEPLOY/k8s" >"$T/k8s.out" 2>&1 <<'EOF'
import sys, pathlib, yaml
docs = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.yaml")):
    docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
kinds = {d["kind"]: d for _, d in docs}
for k in ["Deployment", "Service", "Secret"]:
    assert k in kinds, f"no {k}"
for name, d in docs:
    assert d.get("apiVersion") and d.get("metadata", {}).get("name"), name
dep, svc, sec = kinds["Deployment"], kinds["Service"], kinds["Secret"]
assert dep["spec"]["replicas"] == 2, "2 replicas"
pod = dep["spec"]["template"]
labels = pod["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service selects the pods"
c = pod["spec"]["containers"][0]
assert "/health" in str(c["readinessProbe"]), "readiness on /health"
ports = {p["name"] for p in c["ports"]}
assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
env = {e["name"]: e for e in c["env"]}
assert env["STEP3GW_STORE_BACKEND"]["value"] == "shared"
for k in ["STEP3GW_ADMIN_TOKEN", "STEP3GW_STORE_POSTGRES_URL", "STEP3GW_STORE_REDIS_URL"]:
    ref = env[k]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == sec["metadata"]["name"] and ref["key"] in sec["stringData"], k
print("      " + ", ".join(f"{d['kind']} {d['metadata']['name']} ({n})" for n, d in docs))
EOF
    then
        cat "$T/k8s.out"
        pass "manifests parse and fit together (2 replicas, Service, readiness on /health, Secret keys)"
    else
        indent <"$T/k8s.out"; fail "Kubernetes manifests"
    fi
else
    skip "Kubernetes manifests: PyYAML not installed"
fi
if command -v kubectl >/dev/null 2>&1 && kubectl version --request-timeout=2s >/dev/null 2>&1; then
    if kubectl apply --dry-run=server -f "$DEPLOY/k8s/" >"$T/kubectl.out" 2>&1; then
        pass "kubectl apply --dry-run=server"
    else
        indent <"$T/kubectl.out"; fail "kubectl apply --dry-run=server"
    fi
else
    skip "kubectl apply --dry-run: no cluster reachable (kubectl needs one even for a dry run)"
fi

echo
echo "check: $PASSED passed, $FAILED failed, $SKIPPED skipped"
((FAILED == 0))
