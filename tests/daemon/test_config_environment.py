"""`SEGMAPD_<SECTION>__<KEY>` overrides reach every source kind's keys, typed as they should be."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from listeners import HubSpotSource, JsonSource, SalesforceSource

BASE = """
[cxone]
client_id = "segmapd"
client_secret = "s"
access_key_id = "k"
access_key_secret = "ks"

[sources.hs]
kind = "hubspot"
client_secret = "from-the-file"
public_url = "https://segmapd.example.com/v1/webhooks/hs"

[sources.sf]
kind = "salesforce"
organization_id = "00D5e000000KQ2e"

[sources.zd]
kind = "json"
secret = "from-the-file"
signature_header = "X-Signature"
contact_id = "id"
set = "segments"
"""


def test_overrides_keep_text_as_text_and_parse_numbers_and_lists(tmp_path: Path) -> None:
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(BASE)
    environ = {
        # A numeric secret is still a secret, not an integer.
        "SEGMAPD_SOURCES__HS__CLIENT_SECRET": "12345678",
        "SEGMAPD_SOURCES__HS__TOLERANCE_S": "600",
        "SEGMAPD_SOURCES__SF__ALLOWED_NETWORKS": '["10.0.0.0/8", "192.168.0.0/16"]',
        # A JMESPath literal keeps its quotes.
        "SEGMAPD_SOURCES__ZD__CONTACT_ID": "'fixed-contact'",
        "SEGMAPD_SOURCES__ZD__SIGNATURE_PREFIX": "1",
        "SEGMAPD_SERVER__ADMIN_TOKENS": '["one", "two"]',
    }
    config = load_config(config_file, environ=environ)
    hubspot, salesforce, generic = (config.sources[n] for n in ("hs", "sf", "zd"))
    assert isinstance(hubspot, HubSpotSource)
    assert hubspot.client_secret.get_secret_value() == "12345678"
    assert hubspot.tolerance_s == 600
    assert isinstance(salesforce, SalesforceSource)
    assert salesforce.allowed_networks == ["10.0.0.0/8", "192.168.0.0/16"]
    assert isinstance(generic, JsonSource)
    assert generic.contact_id == "'fixed-contact'"
    assert generic.signature_prefix == "1"
    assert [t.get_secret_value() for t in config.server.admin_tokens] == ["one", "two"]


def test_the_bulk_read_share_is_a_fraction_below_one_and_an_error_names_its_key(
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(BASE)
    config = load_config(config_file, environ={"SEGMAPD_LIMITS__BULK_READ_SHARE_MIN": "0.35"})
    assert config.limits.policy().bulk_share_min == 0.35
    assert load_config(config_file, environ={}).limits.policy().bulk_share_min == 0.2
    for bad in ("1", "1.5", "-0.1", "lots"):
        with pytest.raises(ConfigError, match=r"limits\.bulk_read_share_min"):
            load_config(config_file, environ={"SEGMAPD_LIMITS__BULK_READ_SHARE_MIN": bad})


def test_no_webhook_source_may_take_the_name_the_admin_apis_changes_have(tmp_path: Path) -> None:
    # Dead letters name the admin API's changes `mappings`: a source of that name would be
    # told apart from them by nothing.
    config_file = tmp_path / "segmapd.toml"
    config_file.write_text(BASE + '\n[sources.mappings]\nkind = "standard"\nsecret = "s"\n')
    with pytest.raises(ConfigError, match=r"sources\.mappings: the name is reserved"):
        load_config(config_file, environ={})
