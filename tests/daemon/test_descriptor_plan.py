"""How the descriptor limit is shared between inbound connections and what segmapd keeps."""

from __future__ import annotations

from daemon.config import Config
from daemon.connections import BASE_FDS, plan_descriptors
from daemon.wiring import cxone_pool

MINIMAL = {"cxone": {"client_id": "id", "client_secret": "s", "grant": "client_credentials"}}


def test_a_1024_descriptor_limit_still_serves_with_cxones_default_limits() -> None:
    # 1024 is a common hard limit outside systemd; a fixed reserve of 1,024 CXone connections
    # refused to start there, although CXone's limits never need that many at once.
    config = Config.model_validate(MINIMAL)
    plan = plan_descriptors(config, 1024)
    assert plan.limits is not None
    assert plan.limits.max_connections >= 100
    assert plan.reserved + plan.limits.max_connections + plan.limits.refusal_slots <= 1024


def test_the_cxone_pool_covers_every_request_the_limits_allow_within_one_timeout() -> None:
    config = Config.model_validate(
        {**MINIMAL, "limits": {"write_rps": 10, "single_write_rps": 2, "read_rps": 50}}
    )
    # 62 requests/s for 10 s each at worst, plus token, discovery and refresh calls.
    assert cxone_pool(config) == 62 * 10 + 8
    raised = Config.model_validate({**MINIMAL, "limits": {"read_rps": 5000}})
    assert cxone_pool(raised) == 1024  # capped
    plan = plan_descriptors(raised, 65536)
    assert plan.reserved >= BASE_FDS + 1024
