"""The monitoring files in deploy/ as tests read them: rules, their unit tests, the dashboard.

`metric_names` finds the series names a PromQL expression reads. It is no full parser, but
PromQL's grammar makes names easy to tell apart once strings, label matchers, ranges and
grouping label lists are blanked out: a name is an identifier that is neither a keyword nor
followed by `(` (a function or an aggregation).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.support.ci import IN_CI

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
RECORDING_RULES = PROMETHEUS_DIR / "segmapd-rules.yml"
ALERTING_RULES = PROMETHEUS_DIR / "segmapd-alerts.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "segmapd.json"
README = REPO_ROOT / "README.md"

PROMTOOL_HINT = (
    "promtool is required in CI: apt-get update && "
    "apt-get install -y --no-install-recommends prometheus"
)

# Words of PromQL that look like names but are not: binary operators, modifiers, grouping.
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "atan2",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Not preceded by a word character or a dot: the `e3` of 1e3 and the `m` of 5m are no names.
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def promtool() -> str:
    """The promtool executable; the test is skipped without it, or fails in CI."""
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail(PROMTOOL_HINT)
        pytest.skip("promtool not on PATH (" + PROMTOOL_HINT + ")")
    return found


def metric_names(expr: str) -> set[str]:
    """The names of the series (and recorded series) that a PromQL expression reads."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (their strings are blank by now)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def rules(path: Path) -> list[dict[str, Any]]:
    """Every rule of a Prometheus rule file, in order."""
    document = yaml.safe_load(path.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    """The alerting rules."""
    return rules(ALERTING_RULES)


def recorded() -> dict[str, str]:
    """Recording rule name -> its expression."""
    return {rule["record"]: rule["expr"] for rule in rules(RECORDING_RULES)}


def rule_tests() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each promtool unit test group, with its file."""
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            yield path, group


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard."""
    found: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return found


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """The PromQL of every panel's targets."""
    return [target["expr"] for panel in panels(board) for target in panel.get("targets", [])]


def variable_metrics(board: dict[str, Any]) -> set[str]:
    """The series the template variables' `label_values(series, label)` queries read."""
    found: set[str] = set()
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\(([^,]+),\s*\w+\)", text)
        assert match, f"variable {variable['name']}: {text}"
        found |= metric_names(match.group(1))
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation gone, spaces dashed."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def readme_section(title: str) -> str:
    """The README's text under the level-2 heading `title`, up to the next level-2 heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]
