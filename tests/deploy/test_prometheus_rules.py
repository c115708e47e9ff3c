"""The Prometheus rules in deploy/prometheus: valid, unit-tested with promtool, and documented.

promtool is Prometheus's own checker: `check rules` parses every expression and template as the
server would, and `test rules` evaluates the alerts over the series each unit test writes
(deploy/prometheus/tests/*.yml), firing and not firing.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from daemon.store.shards import SHARDS
from tests.support.monitoring import (
    ALERTING_RULES,
    PROMETHEUS_DIR,
    RECORDING_RULES,
    RULE_TESTS,
    alerts,
    dashboard,
    dashboard_queries,
    github_anchor,
    metric_names,
    promtool,
    readme_section,
    recorded,
    rule_tests,
)

RUNBOOK_BASE = "https://github.com/cxone-segmap/segmapd#"
ALERT_NAME = re.compile(r"Segmapd(?:[A-Z][a-z0-9]*)+")
RECORD_NAME = re.compile(r"[a-z_]+:segmapd_[a-z0-9_]+:[a-z0-9_]+")


def run(*argv: str) -> str:
    result = subprocess.run(
        [promtool(), *argv], capture_output=True, text=True, timeout=120, check=False
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    return report


def test_promtool_checks_the_rules() -> None:
    report = run("check", "rules", str(RECORDING_RULES), str(ALERTING_RULES))
    assert report.count("SUCCESS") == 2, report


def test_the_rules_unit_tests_pass() -> None:
    assert RULE_TESTS
    report = run("test", "rules", *map(str, RULE_TESTS))
    assert report.count("SUCCESS") == len(RULE_TESTS), report


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: dict[str, int] = defaultdict(int)
    quiet: dict[str, int] = defaultdict(int)
    for path, group in rule_tests():
        assert group.get("name"), f"{path.name}: every test group says what it shows"
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet)[case["alertname"]] += 1
    names = {alert["alert"] for alert in alerts()}
    assert set(firing) | set(quiet) <= names, "a test names an alert that does not exist"
    assert [name for name in names if not firing[name]] == [], "never shown firing"
    assert [name for name in names if not quiet[name]] == [], "never shown not firing"


def test_every_rules_test_file_loads_both_rule_files() -> None:
    for path in RULE_TESTS:
        files = yaml.safe_load(path.read_text())["rule_files"]
        loaded = {(path.parent / name).resolve() for name in files}
        assert loaded == {RECORDING_RULES.resolve(), ALERTING_RULES.resolve()}, path.name


@pytest.mark.parametrize("alert", alerts(), ids=lambda alert: alert["alert"])
def test_an_alert_follows_the_monitoring_mixin_conventions(alert: dict[str, object]) -> None:
    name = str(alert["alert"])
    assert ALERT_NAME.fullmatch(name), name
    labels = alert["labels"]
    assert isinstance(labels, dict)
    assert labels["severity"] in {"warning", "critical"}
    annotations = alert["annotations"]
    assert isinstance(annotations, dict)
    assert {"summary", "description", "runbook_url"} <= set(annotations)
    assert annotations["runbook_url"] == RUNBOOK_BASE + name.lower()


def test_every_runbook_url_is_a_heading_of_the_readmes_monitoring_section() -> None:
    section = readme_section("Monitoring")
    headings = re.findall(r"^#### (.+)$", section, re.MULTILINE)
    anchors = {github_anchor(heading): heading for heading in headings}
    names = [alert["alert"] for alert in alerts()]
    for alert in alerts():
        anchor = alert["annotations"]["runbook_url"].removeprefix(RUNBOOK_BASE)
        assert anchor in anchors, f"{alert['alert']}: no README heading for #{anchor}"
    # One section per alert, no section left behind by a removed or renamed alert, and each
    # row of the section's table links its alert's section.
    assert sorted(headings) == sorted(names)
    for name in names:
        assert f"| [`{name}`](#{name.lower()}) |" in section, f"{name} missing from the table"


def test_no_other_readme_heading_takes_an_alerts_anchor() -> None:
    text = (PROMETHEUS_DIR.parents[1] / "README.md").read_text()
    every = [github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)]
    for alert in alerts():
        assert every.count(alert["alert"].lower()) == 1, alert["alert"]


def test_the_readmes_edit_of_the_runbook_base_rewrites_every_link(tmp_path: Path) -> None:
    [edit] = [
        line
        for line in readme_section("Monitoring").splitlines()
        if line.startswith("sed -i ") and "segmapd-alerts.yml" in line
    ]
    copy = tmp_path / "segmapd-alerts.yml"
    copy.write_text(ALERTING_RULES.read_text())
    argv = shlex.split(edit)
    subprocess.run([*argv[:-1], str(copy)], check=True, timeout=30)
    text = copy.read_text()
    assert RUNBOOK_BASE not in text
    assert text.count("runbook_url: https://git.example.com/ops/segmapd#") == len(alerts())


def test_recording_rules_are_named_by_convention_and_each_is_used() -> None:
    records = recorded()
    assert all(RECORD_NAME.fullmatch(name) for name in records), list(records)
    used: set[str] = set()
    for alert in alerts():
        used |= metric_names(alert["expr"])
    for query in dashboard_queries(dashboard()):
        used |= metric_names(query)
    assert set(records) <= used, f"recorded but never read: {set(records) - used}"
    read = {name for name in used if ":" in name}
    assert read <= set(records), f"read but never recorded: {read - set(records)}"


def test_the_unowned_shards_alert_counts_the_journals_shards() -> None:
    [alert] = [a for a in alerts() if a["alert"] == "SegmapdShardsUnowned"]
    assert re.search(rf"<\s*{SHARDS}\b", alert["expr"]), alert["expr"]


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (endpoint, le) (rate(a_bucket{job=~"$job", x="y"}[5m])))'
        " / on (job) group_left b_total offset 1h unless ignoring (le) c:d:e > 1e3"
        ' and time() - max(f{g="h"} > 0) or label_replace(i, "j", "$1", "k", "(.*)")'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:d:e", "f", "i"}
