"""config/prometheus/ and config/grafana/: valid for promtool, alerts that fire when they should
(promtool's unit tests, tests/config/alerts_test.yml), and every metric a rule or a dashboard
query names is one a real worker node serves (scraped from a live metrics endpoint), with the
labels the queries group by.

promtool comes with Debian's `prometheus` package; .ci/run installs it. Without it these tests
fail, naming the install command.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import claimed_db, free_port
from worker.publish import Publisher
from worker.settings import load_settings

PROMETHEUS = REPO_ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = REPO_ROOT / "config" / "grafana" / "snowpipe.json"
ALERT_TESTS = Path(__file__).parent / "alerts_test.yml"
INSTALL = "apt-get install -y --no-install-recommends prometheus"
METRIC = re.compile(r"\bsnowpipe_[a-z0-9_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus itself puts on every scraped series, and the histogram buckets' label.
SCRAPE_LABELS = {"job", "instance", "le"}
PIPE = "EVENTS-STREAMING"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"promtool is not installed: `{INSTALL}` (Debian's prometheus package; "
                    ".ci/run installs it)")  # fmt: skip
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_scrape_config_and_the_rules(promtool: str) -> None:
    rules = run(promtool, "check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout  # alerts.yml, found from prometheus.yml


def test_the_alerts_fire_when_they_should_and_only_then(promtool: str) -> None:
    done = run(promtool, "test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == set(alerts()), "every alert has a promtool test"


def alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def squeeze(expr: str) -> str:
    return " ".join(expr.split())


def test_the_readme_and_the_docs_show_the_alerts_as_they_are_in_the_file() -> None:
    rules = alerts()
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("Example alerts", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(block)
    assert len(shown) == 3
    for rule in shown:
        assert squeeze(rule["expr"]) == squeeze(rules[rule["alert"]]["expr"]), rule["alert"]
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    for name in rules:
        assert f"`{name}`" in operations, f"docs/operations.md does not list {name}"


def test_the_scrape_job_is_the_one_the_rules_watch() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "snowpipe-worker"
    assert 'up{job="snowpipe-worker"}' in alerts()["SnowpipeWorkerDown"]["expr"]
    assert config["rule_files"] == ["alerts.yml"]


# --- Against a live worker node -------------------------------------------------------------


class Exported:
    """What a worker node's endpoint serves: series names, and the labels of each family."""

    def __init__(self, text: str) -> None:
        self.series: set[str] = set()
        self.labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
            }.get(family.type, ("",))
            names = {family.name + suffix for suffix in suffixes}
            names |= {sample.name for sample in family.samples}
            labels = {label for sample in family.samples for label in sample.labels}
            for name in names:
                self.series.add(name)
                self.labels.setdefault(name, set()).update(labels)


@pytest.fixture(scope="module")
def exported(shared_emulator: RunningEmulator, tmp_path_factory: pytest.TempPathFactory
             ) -> Exported:  # fmt: skip
    """One scrape of a real worker node that delivered a few batches (threads pool)."""
    tmp = tmp_path_factory.mktemp("metrics")
    pair = key_pair("monitoring")
    shared_emulator.register_key(ACCOUNT, USER, pair.public_pem)
    port = free_port()
    with claimed_db() as db:
        env = worker_env(
            shared_emulator, db.url, pair.write_private(tmp / "key.pem"),
            queue=unique_queue("monitoring"), metrics_port=port, channels_per_pipe=2,
            append_linger_seconds=0.1,
        )  # fmt: skip
        publisher = Publisher(load_settings(**settings_overrides(env)))
        worker = launch_worker(env, tmp, name="monitoring", concurrency=2)
        with running(worker):
            for batch in range(4):
                publisher.publish(make_rows(batch * 5, 5), database=DATABASE, schema=SCHEMA,
                                  pipe=PIPE, batch_id=f"monitoring-{batch}")  # fmt: skip

            def scraped() -> str:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as answer:
                    return str(answer.read().decode())

            # Committed, and the balancer's tick has read the channel logs' depth.
            wait_until(
                lambda: "snowpipe_rows_committed_total{" in (text := scraped())
                and "snowpipe_channel_log_entries{" in text,
                timeout=60, what="a scrape after the commits", logs=[worker],
            )  # fmt: skip
            return Exported(scraped())


def queries_of_the_dashboard() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def unknown_metrics(exprs: list[str], exported: Exported) -> list[str]:
    return sorted({m for e in exprs for m in METRIC.findall(e) if m not in exported.series})


def unknown_labels(exprs: list[str], exported: Exported) -> list[str]:
    """`by (...)` labels that no metric of the expression carries."""
    problems = []
    for expr in exprs:
        known = set(SCRAPE_LABELS)
        for metric in METRIC.findall(expr):
            known |= exported.labels.get(metric, set()) | declared_labels(metric)
        for group in GROUPING.findall(expr):
            wanted = {label.strip() for label in group.split(",") if label.strip()}
            problems += [f"{label} in {expr}" for label in sorted(wanted - known)]
    return problems


def declared_labels(series: str) -> set[str]:
    """The label names a metric is declared with (for those with no sample in a short run):
    the metrics of worker/observability.py, and the node gauges of worker/metrics.py."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import worker.observability  # noqa: F401 (registers the metrics)
    from worker.metrics import NodeCollector

    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            names = REGISTRY._collector_to_names[collector]
            if series in names:
                return set(collector._labelnames)
    for family in NodeCollector([]).collect():
        if family.name == series:
            return set(getattr(family, "_labelnames", ()))
    return set()


def test_every_metric_a_rule_uses_is_served_by_a_worker_node(exported: Exported) -> None:
    exprs = [rule["expr"] for rule in alerts().values()]
    assert unknown_metrics(exprs, exported) == []
    assert unknown_labels(exprs, exported) == []


def test_every_dashboard_query_names_a_metric_a_worker_node_serves(exported: Exported) -> None:
    exprs = queries_of_the_dashboard()
    assert all(METRIC.search(e) for e in exprs), "a query without a snowpipe metric"
    assert unknown_metrics(exprs, exported) == []
    assert unknown_labels(exprs, exported) == []


def test_the_dashboard_asks_for_its_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
