"""The fleet's Prometheus and Grafana files (deploy/) query only metrics the code exports, and compose wires them up.

promtool, where installed (on PATH, or BULKGEN_PROMTOOL=/path/to/promtool), also checks the config, the alert
rules and their unit tests (deploy/prometheus/alerts_test.yml), and parses every dashboard query.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import metrics as reconcile_metrics
from contract.settings import Settings
from workers import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards"
METRIC = re.compile(r"\bbulkgen_[A-Za-z0-9_:]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
"""The series names prometheus_client exports per metric type (the _created series are not meant for queries)."""


def exported_names() -> set[str]:
    """Every series name a worker process and a reconciler export (workers.metrics' two registries)."""
    names = set()
    for registry in (metrics.REGISTRY, reconcile_metrics.RECONCILER_REGISTRY):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    paths = sorted(DASHBOARDS.glob("*.json"))
    assert paths, "no dashboard in deploy/grafana/dashboards"
    return [(path, json.loads(path.read_text())) for path in paths]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target and of every query variable."""
    queries = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_queried_metric_is_exported() -> None:
    exported = exported_names()
    queried: dict[str, set[str]] = {}
    for path, dashboard in dashboards():
        for query in dashboard_queries(dashboard):
            for name in METRIC.findall(query):
                queried.setdefault(name, set()).add(path.name)
    for rule in alert_rules():
        for name in METRIC.findall(rule["expr"]):
            queried.setdefault(name, set()).add(f"alerts.yml {rule['alert']}")
    unknown = {name: sorted(where) for name, where in queried.items() if name not in exported}
    assert not unknown, f"queried, never exported: {unknown}"
    # what the dashboard is for (issue 14): each of these is on it
    wanted = {
        "bulkgen_tokens_generated_total", "bulkgen_queue_depth", "bulkgen_running_rows", "bulkgen_batch_occupancy_sum",
        "bulkgen_requests_total", "bulkgen_retries_total", "bulkgen_reconciler_lapsed_leases_total",
        "bulkgen_reconciler_resent_requests_total", "bulkgen_store_write_seconds_bucket", "bulkgen_gpu_memory_bytes",
    }
    on_dashboards = {name for name, where in queried.items() if any(w.endswith(".json") for w in where)}
    assert wanted <= on_dashboards, wanted - on_dashboards


def test_the_metric_check_tells_a_series_name_from_its_metric() -> None:
    """A counter is queried with _total, a histogram by its _bucket/_sum/_count: the bare names are not exported."""
    exported = exported_names()
    assert "bulkgen_tokens_generated_total" in exported and "bulkgen_tokens_generated" not in exported
    assert "bulkgen_store_write_seconds_bucket" in exported and "bulkgen_store_write_seconds" not in exported
    assert "bulkgen_queue_depth" in exported and "bulkgen_queue_depth_total" not in exported


def test_dashboards_are_valid_and_every_panel_has_the_datasource() -> None:
    (datasource,) = [ds for path in DATASOURCES.glob("*.yml") for ds in yaml.safe_load(path.read_text())["datasources"]]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    uids = set()
    for path, dashboard in dashboards():
        assert dashboard["uid"] not in uids, path
        uids.add(dashboard["uid"])
        assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int), path
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(dashboard):
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip() and target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable["type"] == "query":
                assert variable["datasource"]["uid"] == datasource["uid"], variable["name"]


def test_alert_rules_have_what_prometheus_and_a_reader_need() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    queried = " ".join(rule["expr"] for rule in rules)
    for name in ("bulkgen_queue_depth", 'up{job="bulkgen-workers"}', 'outcome="failed"', "bulkgen_reconciler_resent_requests_total"):
        assert name in queried, name  # a queue nobody consumes, no worker up, failures, re-sends


def test_compose_runs_prometheus_and_grafana_on_the_files_that_exist() -> None:
    services = compose()["services"]
    for name, wanted in (("prometheus", {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"}),
                         ("grafana", {"/etc/grafana/provisioning", "/etc/bulkgen/dashboards"})):
        binds = {}
        for volume in services[name]["volumes"]:
            source, target, *mode = volume.split(":")
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
                assert mode == ["ro"], f"{name} mounts {source} writable"
                binds[target] = source
            else:
                assert source in compose()["volumes"], source
        assert wanted <= set(binds), wanted - set(binds)
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert re.search(r"^GRAFANA_ADMIN_PASSWORD=$", (ROOT / ".env.example").read_text(), re.M)
    home = grafana["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith("/etc/bulkgen/dashboards/") and (DASHBOARDS / Path(home).name).is_file()
    (provider,) = [p for path in DASHBOARD_PROVIDERS.glob("*.yml") for p in yaml.safe_load(path.read_text())["providers"]]
    assert provider["options"]["path"] == "/etc/bulkgen/dashboards"
    rule_files = yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]
    assert rule_files == ["alerts.yml"]  # next to prometheus.yml, there and in the container


def test_prometheus_scrapes_the_worker_and_its_reconciler() -> None:
    worker = compose()["services"]["worker"]
    port = int(worker["environment"]["BULKGEN_METRICS_PORT"])
    assert f"{port}:{port}" in worker["ports"]
    reconciler_port = int(worker["environment"].get("BULKGEN_RECONCILER_METRICS_PORT", Settings().reconciler_metrics_port))
    targets = {
        job["job_name"]: {t for config in job["static_configs"] for t in config["targets"]}
        for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    }
    assert f"worker:{port}" in targets["bulkgen-workers"]
    assert f"worker:{reconciler_port}" in targets["bulkgen-reconciler"]


def _promtool() -> str:
    found = os.environ.get("BULKGEN_PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (set BULKGEN_PROMTOOL or put it on PATH)")
    return found


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_promtool_checks_the_config_the_rules_and_their_unit_tests() -> None:
    promtool = _promtool()
    _run(promtool, "check", "config", str(PROMETHEUS_YML))
    _run(promtool, "check", "rules", str(ALERTS_YML))
    _run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query, its Grafana variables filled in, as a recording rule: `promtool check rules` parses its PromQL."""
    promtool = _promtool()
    rules = []
    for _, dashboard in dashboards():
        for i, query in enumerate(dashboard_queries(dashboard)):
            if query.startswith("label_values("):  # Grafana's, not PromQL: its argument is
                query = query[len("label_values("):].rsplit(",", 1)[0]
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": query.replace("$model", ".*")})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(promtool, "check", "rules", str(path))
