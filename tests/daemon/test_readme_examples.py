"""Every `[sources.*]` example in the README is a configuration segmapd starts with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.config import load_config
from listeners import make_adapter

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = [
    block
    for block in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    if "[sources." in block
]
CXONE = """
[cxone]
client_id = "segmapd"
client_secret = "test-client-secret"
access_key_id = "test-key"
access_key_secret = "test-key-secret"
"""


def test_the_readme_shows_every_kind() -> None:
    kinds = set(re.findall(r'^kind = "(\w+)"', "\n".join(BLOCKS), flags=re.MULTILINE))
    assert kinds == {"standard", "hubspot", "salesforce", "json"}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: re.findall(r"\[sources\.(\w+)\]", b)[0])
def test_a_readme_source_example_loads_and_builds_its_adapter(block: str, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in re.findall(r'_file = "([^"/]+)"', block):
        # A standard source's secret must be a real whsec_ key; the others take any text.
        value = "whsec_" + "A" * 32 if name == "webhook_secret" else f"test-{name}"
        (credentials / name).write_text(value + "\n")
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(block if "[cxone]" in block else CXONE + block)
    config = load_config(config_file, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.sources
    for source in config.sources.values():
        make_adapter(source)
