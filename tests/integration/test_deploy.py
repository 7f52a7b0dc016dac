"""deploy/: the alert rules pass promtool (and their unit tests), a live daemon's /metrics
passes `promtool check metrics` and exports every metric the dashboard and the alerts name, the
dashboard JSON is what its generator makes, the systemd units pass `systemd-analyze verify`
(and the daemon runs under their MemoryDenyWriteExecute), the Kubernetes manifests parse and
carry the probes, and the Containerfile is a sensible build file.

promtool (Debian's `prometheus`) and systemd-analyze (Debian's `systemd`) are installed here on
first use when missing, as root with apt-get; elsewhere those tests skip, saying so."""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from projector.cdc_scenario import school_log
from projector.config import parse_config
from tests.conftest import ROOT, Services
from tests.integration.gaps_harness import FakeClock, running_daemon, wait_until
from tests.integration.harness import (
    config_dict,
    migrate_all,
    projection,
    publish,
    rows,
    write_config,
)
from tests.integration.test_correlation import (
    TABLES,
    change_message,
    end_message,
    enrolments,
    send,
)
from tests.integration.test_correlation import projection as school_projection
from tests.integration.test_gaps import split_log
from tests.integration.test_ops import get, value

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "projector.json"
PROJECTOR_BIN = Path(sys.executable).parent / "projector"


# ---------------------------------------------------------------- Debian tools, installed once
def debian_tool(tool: str, package: str) -> str:
    """The tool's path; installed with apt-get (as root) when missing, `apt-get update` only if
    the first attempt fails. Package maintainer scripts may not start services meanwhile."""
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{tool} is missing; install it as root: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", *args], check=False, env=env, capture_output=True, text=True, timeout=900
        )

    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\n# no service starts while tests install packages\nexit 101\n")
        policy.chmod(0o755)
    try:
        install = ("install", "-y", "-q", "--no-install-recommends", package)
        if apt(*install).returncode != 0:
            updated = apt("update", "-q")
            assert updated.returncode == 0, f"apt-get update failed:\n{updated.stderr[-3000:]}"
            done = apt(*install)
            assert done.returncode == 0, f"apt-get install {package} failed:\n{done.stderr[-3000:]}"
    finally:
        if ours:
            policy.unlink()
    found = shutil.which(tool)
    assert found, f"Debian's {package} is installed but {tool} is not on PATH"
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return debian_tool("promtool", "prometheus")


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return debian_tool("systemd-analyze", "systemd")


@pytest.fixture(scope="module")
def strace() -> str:
    return debian_tool("strace", "strace")


def run(*cmd: str, stdin: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, check=False, input=stdin, capture_output=True, text=True, timeout=120, **kw
    )


# ---------------------------------------------------------------- Prometheus: rules and metrics
def test_alert_rules_pass_promtool(promtool: str) -> None:
    """Proves the alert rules are valid (`promtool check rules`) and fire as intended on
    synthetic series (`promtool test rules`: the gap, lag, dead letter, back-pressure,
    replay, stalled loop, down and absent alerts, and the ones that must stay quiet)."""
    checked = run(promtool, "check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    tested = run(promtool, "test", "rules", "alerts_test.yaml", cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "by (projection)" in rule["expr"]:
            assert "$labels.projection" in rule["annotations"]["summary"], rule["alert"]


_NAME = re.compile(r"\bprojector_[a-zA-Z0-9_:]*")


def names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or label_values() query): identifiers starting with
    projector_, outside quoted strings (label values)."""
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(_NAME.findall(unquoted))


def dashboard_queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    exprs += [str(v["query"]) for v in data["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_queries() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def exported_names(text: str) -> set[str]:
    """Sample names in an exposition (projector_events_total, ..._bucket, ...)."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_queries_name_metrics() -> None:
    """Proves the name extraction the next test relies on: it finds the names the dashboard and
    alerts use and nothing from label values."""
    assert names_in('rate(projector_events_total{outcome="projector_x"}[5m])') == {
        "projector_events_total"
    }
    assert len(set().union(*map(names_in, dashboard_queries()))) >= 14
    assert len(set().union(*map(names_in, alert_queries()))) >= 8


def test_live_metrics_pass_promtool_and_cover_every_queried_metric(
    promtool: str, services: Services, pg_dsn: str, new_topic: Callable[..., str]
) -> None:
    """Proves, against a real run (a gap whose replay is requested, a dead letter, lag, and a
    correlated projection with an outbox beside it), that /metrics passes `promtool check
    metrics`, and that every metric named by a dashboard query or an alert rule is one the
    daemon really exports (histograms by their _bucket/_sum/_count, counters by _total)."""
    _, delivered, _ = split_log(accounts=2, events=4, withheld_seqs={2})
    topic, requests = new_topic(partitions=2), new_topic()
    publish(services.kafka, topic, [*delivered, b"{not json"])
    replay = {"channel": "kafka", "topic": requests}
    accounts = projection("accounts", [topic], ["handlers.accounts"], gap_timeout="30s")
    accounts["replay"] = replay
    school_topics = {name: new_topic() for name in (*TABLES, "transaction")}
    school = school_projection(
        school_topics, ["handlers.school_history"], outbox={"topic": new_topic()}
    )
    (tx,) = enrolments(school_log(random.Random(5), changes=60), 1)  # one business event
    send(
        services,
        [*(change_message(school_topics, c) for c in tx.changes), end_message(school_topics, tx)],
    )
    data = config_dict(services, pg_dsn, [accounts, school])
    data["metrics"] = {"enabled": True, "port": 0, "stall_after": "1s"}
    config = parse_config(data, env={})
    migrate_all(config)
    wanted = set().union(*map(names_in, dashboard_queries() + alert_queries()))
    clock = FakeClock()
    with running_daemon(config, clock) as daemon:
        assert daemon.ops is not None
        port = daemon.ops.port
        wait_until(lambda: value(port, "projector_dead_letters_open", projection="accounts"), "DL")
        wait_until(lambda: value(port, "projector_open_gaps", projection="accounts") == 2, "gaps")
        clock.advance(31)  # past gap_timeout: the gap timer requests the replays
        deadline, text, missing = time.monotonic() + 30, "", wanted
        while missing and time.monotonic() < deadline:
            _, text = get(port, "/metrics")
            missing = wanted - exported_names(text)
            time.sleep(0.1)
    assert not missing, f"named in the dashboard or alerts, not exported: {sorted(missing)}"
    checked = run(promtool, "check", "metrics", stdin=text)
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"
    assert 'outcome="sent"' in text and 'kind="' in text
    documented = (ROOT / "docs" / "operations.md").read_text()
    families = re.findall(r"^# TYPE (projector_\w+) ", text, re.MULTILINE)
    undocumented = [
        f for f in families if not f.endswith("_created") and f"`{f}`" not in documented
    ]
    assert not undocumented, f"missing from the metrics table in docs/operations.md: {undocumented}"


# ---------------------------------------------------------------- Grafana
def test_dashboard_json_is_the_generators_output() -> None:
    """Proves deploy/grafana/projector.json is exactly what deploy/grafana/dashboard.py makes
    (regenerate it when this fails), with the panels operators need and the projection
    variable."""
    made = run(sys.executable, str(DEPLOY / "grafana" / "dashboard.py"))
    assert made.returncode == 0, made.stderr
    assert made.stdout == DASHBOARD.read_text(), (
        "stale: .venv/bin/python deploy/grafana/dashboard.py > deploy/grafana/projector.json"
    )
    data = json.loads(made.stdout)
    titles = {p["title"] for p in data["panels"]}
    for needed in (
        "Consumer lag (messages) per partition",
        "Consumer lag (seconds) per partition",
        "Throughput by outcome",
        "Parked events",
        "Open gaps",
        "Oldest gap age vs gap_timeout",
        "Open dead letters",
        "Dead letters recorded",
        "Apply latency",
        "Batch size",
        "Back-pressure",
        "Replay requests by outcome",
    ):
        assert needed in titles
    assert {v["name"] for v in data["templating"]["list"]} == {"datasource", "projection"}
    for p in data["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            if "projector_" in t["expr"] and "build_info" not in t["expr"]:
                assert '{projection=~"$projection"}' in t["expr"], t["expr"]


# ---------------------------------------------------------------- systemd
def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key`` → its values (a key may repeat), all sections together."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, val = line.partition("=")
            out.setdefault(key.strip(), []).append(val.strip())
    return out


def test_systemd_units_verify(systemd_analyze: str, tmp_path: Path) -> None:
    """Proves both units pass `systemd-analyze verify` without a warning (ExecStart pointed at
    this virtualenv's projector, which must exist) and `systemd-analyze security` rates their
    exposure OK, and that they carry the restart policy, the graceful
    stop, the secrets file, the runtime directory and the hardening; the migrate oneshot runs
    before the daemon."""
    assert PROJECTOR_BIN.exists()
    units = []
    for name in ("projector.service", "projector-migrate.service"):
        text = (SYSTEMD / name).read_text()
        assert "ExecStart=/usr/local/bin/projector " in text
        (tmp_path / name).write_text(text.replace("/usr/local/bin/projector", str(PROJECTOR_BIN)))
        units.append(str(tmp_path / name))
    verified = run(systemd_analyze, "verify", *units)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert str(tmp_path) not in verified.stdout + verified.stderr, verified.stderr
    # systemd's own hardening score: exposure at most 2.0 of 10 ("OK"; 1.4 when written).
    scored = run(systemd_analyze, "security", "--offline=true", "--threshold=20", *units)
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr

    main, migrate = (
        unit_settings(SYSTEMD / "projector.service"),
        unit_settings(SYSTEMD / "projector-migrate.service"),
    )
    assert main["ExecStart"] == ["/usr/local/bin/projector run -c /etc/projector/config.yaml"]
    assert main["Restart"] == ["on-failure"] and main["RestartSec"]
    assert main["StartLimitIntervalSec"] and main["StartLimitBurst"]
    assert main["KillSignal"] == ["SIGTERM"]
    assert int(main["TimeoutStopSec"][0].removesuffix("s")) >= 60
    assert main["User"] == ["projector"] and main["Group"] == ["projector"]
    assert main["EnvironmentFile"] == ["-/etc/projector/env"]
    assert main["RuntimeDirectory"] == ["projector"]
    assert "XDG_RUNTIME_DIR=/run/projector" in main["Environment"]
    assert "projector-migrate.service" in " ".join(main["After"] + main["Wants"])
    for key, val in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }.items():
        assert main[key] == [val], key
        assert migrate[key] == [val], key
    assert migrate["Type"] == ["oneshot"] and migrate["Before"] == ["projector.service"]
    assert migrate["ExecStart"] == [
        "/usr/local/bin/projector migrate -c /etc/projector/config.yaml"
    ]


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
_UNDER_MDWE = f"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0, ctypes.get_errno()
assert libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0) == {PR_MDWE_REFUSE_EXEC_GAIN}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("a writable and executable mapping was allowed: MDWE is not in force")
except OSError:
    pass
from projector.cli import main
sys.argv = ["projector", *sys.argv[1:]]
main()
"""


def mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


def small_run(services: Services, pg_dsn: str, topic: str, tmp_path: Path) -> Path:
    """Three accounts' events on ``topic``, the schema migrated; the config file's path."""
    log, _, _ = split_log(accounts=3, events=5, withheld_seqs=set())
    publish(services.kafka, topic, log)
    data = config_dict(services, pg_dsn, [projection("accounts", [topic], ["handlers.accounts"])])
    migrate_all(parse_config(data, env={}))
    return write_config(tmp_path / "config.yaml", data)


def test_daemon_runs_under_memory_deny_write_execute(
    services: Services, pg_dsn: str, new_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Proves the unit's MemoryDenyWriteExecute=yes is safe for projector's own stack
    (confluent-kafka, psycopg's C build, pydantic-core, PyYAML): under the kernel's equivalent
    (prctl PR_SET_MDWE, which refuses writable+executable memory the same way) `projector run
    --exit-when-caught-up` applies a topic to the views and exits 0."""
    if "MemoryDenyWriteExecute=yes" not in (SYSTEMD / "projector.service").read_text():
        pytest.skip("the unit does not set MemoryDenyWriteExecute=yes")
    if not mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to test it with")
    path = small_run(services, pg_dsn, new_topic(), tmp_path)
    done = run(
        sys.executable, "-c", _UNDER_MDWE, "run", "-c", str(path), "--exit-when-caught-up", cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(pg_dsn, "select count(*) from accounts.accounts") == [(3,)]


def syscall_set(systemd_analyze: str, spec: str) -> set[str]:
    """The system calls a SystemCallFilter= value names, groups expanded."""
    names: set[str] = set()
    for item in spec.split():
        if not item.startswith("@"):
            names.add(item)
            continue
        listed = run(systemd_analyze, "syscall-filter", item).stdout.splitlines()[1:]
        for line in (entry.strip() for entry in listed):
            if line and not line.startswith("#"):
                names |= syscall_set(systemd_analyze, line)
    return names


def test_daemon_stays_within_the_units_system_call_filter(
    systemd_analyze: str,
    strace: str,
    services: Services,
    pg_dsn: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Proves the unit's SystemCallFilter= allows every system call projector makes: `projector
    migrate` and `projector run --exit-when-caught-up` under strace use none it denies (a denied
    call would fail with EPERM in production)."""
    allowed: set[str] = set()
    for spec in unit_settings(SYSTEMD / "projector.service")["SystemCallFilter"]:
        if spec.startswith("~"):
            allowed -= syscall_set(systemd_analyze, spec[1:])
        else:
            allowed |= syscall_set(systemd_analyze, spec)
    assert {"read", "connect", "futex"} <= allowed
    path = small_run(services, pg_dsn, new_topic(partitions=2), tmp_path)
    used: set[str] = set()
    for args in (("migrate",), ("run", "--exit-when-caught-up")):
        summary = tmp_path / "strace.txt"
        done = run(
            strace, "-f", "-c", "-o", str(summary), str(PROJECTOR_BIN), *args, "-c", str(path)
        )
        if done.returncode != 0 and "ptrace" in done.stderr:
            pytest.skip(f"strace cannot trace here: {done.stderr.strip()}")
        assert done.returncode == 0, done.stdout + done.stderr
        table = summary.read_text().splitlines()
        used |= {line.split()[-1] for line in table if re.match(r"\s*\d+\.\d+\s", line)}
    used.discard("total")
    assert len(used) > 20, used
    assert not used - allowed, f"denied by SystemCallFilter=: {sorted(used - allowed)}"


# ---------------------------------------------------------------- Kubernetes
def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


def test_kubernetes_manifests(tmp_path: Path) -> None:
    """Proves the manifests parse, kustomization.yaml lists them all, the StatefulSet has the
    probes on the right paths and port, POD_NAME from the pod's name, the DSN from a Secret,
    graceful termination and a locked-down security context; Service, PodDisruptionBudget and
    ServiceMonitor select what they should; the ConfigMap's config validates (instance_id the
    pod name, metrics on 0.0.0.0 at the probed port) and passes `projector check-config`; the
    migrate Job runs `projector migrate` with the same config."""
    docs = list(manifests())
    kinds = {d["kind"]: d for _, d in docs if d["kind"] != "Kustomization"}
    assert set(kinds) == {
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Job",
    }
    kustomization = next(d for _, d in docs if d["kind"] == "Kustomization")
    files = {name for name, d in docs if d["kind"] != "Kustomization"}
    assert set(kustomization["resources"]) == files
    assert kinds["ServiceMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"

    sts, svc, cm = kinds["StatefulSet"], kinds["Service"], kinds["ConfigMap"]
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for selector in (
        spec["selector"]["matchLabels"],
        svc["spec"]["selector"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    monitor = kinds["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["securityContext"]["runAsNonRoot"] is True

    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["PROJECTOR_PG_DSN"]["valueFrom"]["secretKeyRef"]["key"] == "PROJECTOR_PG_DSN"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        assert container[probe]["httpGet"]["path"] == path, probe
        assert container[probe]["httpGet"]["port"] in ports, probe
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    # The config, as the pod sees it.
    assert container["args"] == ["run", "-c", "/etc/projector/config.yaml"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/projector")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    pod_env = {"POD_NAME": "projector-1", "PROJECTOR_PG_DSN": "postgresql://u:pw@pg:5432/db"}
    config = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), env=pod_env)
    assert config.kafka.instance_id == "projector-1"
    assert config.metrics.host == "0.0.0.0" and config.metrics.enabled
    assert config.metrics.port == ports[container["livenessProbe"]["httpGet"]["port"]]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(cm["data"]["config.yaml"])
    checked = run(
        str(PROJECTOR_BIN), "check-config", "-c", str(config_path), env={**os.environ, **pod_env}
    )
    assert checked.returncode == 0 and "config OK" in checked.stdout, checked.stderr
    assert "pw@" not in checked.stdout

    job = kinds["Job"]["spec"]["template"]["spec"]
    [migrate] = job["containers"]
    assert migrate["args"] == ["migrate", "-c", "/etc/projector/config.yaml"]
    assert migrate["image"] == container["image"]
    assert {e["name"] for e in migrate["env"]} >= {"POD_NAME", "PROJECTOR_PG_DSN"}


# ---------------------------------------------------------------- Containerfile
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, "a continuation line runs off the end"
    return out


def test_containerfile() -> None:
    """Proves deploy/Containerfile is a sensible build file (it can't be built here: no
    container engine): known instructions only, the final stage FROM python:3.11-slim, a
    non-root USER, ENTRYPOINT projector with CMD `run -c /etc/projector/config.yaml`, EXPOSE
    9400, and every COPY source present in the repository (the SQL migrations ship inside the
    wheel: see test_the_wheel_carries_the_sql_migrations)."""
    steps = instructions((DEPLOY / "Containerfile").read_text())
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {word for word, _ in steps} <= known | {"HEALTHCHECK", "ARG", "LABEL"}
    final = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert steps[0][0] == "FROM"
    assert steps[final][1].split()[0] == "python:3.11-slim"
    tail = dict(steps[final:])
    user = tail["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(tail["ENTRYPOINT"]) == ["projector"]
    assert json.loads(tail["CMD"]) == ["run", "-c", "/etc/projector/config.yaml"]
    assert tail["EXPOSE"] == "9400"
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), source
