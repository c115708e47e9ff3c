"""The Grafana dashboard deploy/grafana/segmapd.json: importable anywhere, and valid PromQL.

Every query is checked by promtool, which parses PromQL as Prometheus does: each becomes a
recording rule of a scratch rule file, with Grafana's `$__rate_interval` as a fixed range (the
other variables sit in label matcher strings, where any text parses).
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.support.monitoring import dashboard, dashboard_queries, panels, promtool

ROWS = [
    "Overview",
    "Intake",
    "Upstream (CXone) outcomes by class",
    "Write and validation latency",
    "Queue depths by state",
    "Rate-gate waits and pauses",
    "Dead letters",
    "Reconcile",
    "Cluster ownership (PostgreSQL)",
]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def rows(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each row's title -> the panels below it, up to the next row."""
    found: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = found.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))
        else:
            current.append(panel)
    return found


def test_the_dashboard_identifies_itself_and_picks_its_data_source() -> None:
    board = dashboard()
    assert board["title"] == "segmapd"
    assert board["uid"] == "segmapd"
    assert board["schemaVersion"] == 39
    assert board["id"] is None  # Grafana assigns its own on import
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE


def test_every_panel_and_query_uses_the_chosen_data_source() -> None:
    board = dashboard()
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert 'instance=~"$instance"' in target["expr"] or 'job=~"$job"' in target["expr"]
    ids = Counter(panel["id"] for panel in panels(board))
    assert [panel_id for panel_id, n in ids.items() if n > 1] == []


def test_the_rows_cover_what_an_operator_looks_at() -> None:
    found = rows(dashboard())
    assert list(found) == ROWS
    assert all(found[title] for title in ROWS), "an empty row"
    latency = [t["expr"] for p in found["Write and validation latency"] for t in p["targets"]]
    assert latency
    for expr in latency:
        assert expr.startswith("histogram_quantile(") and "_bucket" in expr, expr


def test_no_two_panels_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert not cells & taken, panel["title"]
        taken |= cells


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    queries = dashboard_queries(dashboard())
    scratch = tmp_path / "dashboard-queries.yml"
    rules = [
        {"record": f"dashboard:query:{n}", "expr": q.replace("$__rate_interval", "5m")}
        for n, q in enumerate(queries)
    ]
    scratch.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(scratch)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert f"SUCCESS: {len(queries)} rules found" in report, report
