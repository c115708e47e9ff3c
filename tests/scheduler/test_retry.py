import random

import pytest

from scheduler.retry import RetryPolicy


class FixedRandom(random.Random):
    """A random source whose uniform() returns a chosen point of the interval."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def test_backoff_follows_the_contract_without_jitter():
    policy = RetryPolicy()
    rng = FixedRandom(0.0)
    delays = [policy.delay(n, rng) for n in range(1, 10)]
    assert delays[:4] == pytest.approx([2.0, 3.0, 4.5, 6.75])
    # 2 * 1.5**8 = 51.3 would exceed the cap
    assert delays[-1] == pytest.approx(30.0)
    assert max(delays) == pytest.approx(30.0)


def test_jitter_adds_up_to_one_second_uniformly():
    policy = RetryPolicy()
    assert policy.delay(1, FixedRandom(1.0)) == pytest.approx(3.0)
    assert policy.delay(1, FixedRandom(0.5)) == pytest.approx(2.5)
    rng = random.Random(7)
    samples = [policy.delay(3, rng) for _ in range(2000)]
    assert min(samples) >= 4.5
    assert max(samples) <= 5.5
    # A uniform spread, not a constant: both halves of the interval are used.
    assert sum(s < 5.0 for s in samples) > 800
    assert sum(s >= 5.0 for s in samples) > 800


def test_retry_after_wins_only_when_larger():
    policy = RetryPolicy()
    rng = FixedRandom(0.0)
    assert policy.delay(1, rng, retry_after_s=10.0) == pytest.approx(10.0)
    assert policy.delay(4, rng, retry_after_s=1.0) == pytest.approx(6.75)


def test_attempt_budget():
    policy = RetryPolicy(attempts=5)
    assert not policy.exhausted(4)
    assert policy.exhausted(5)
    with pytest.raises(ValueError):
        policy.delay(0, random.Random())


def test_configured_policy():
    policy = RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=5.0, jitter_ms=0.0, attempts=3)
    rng = random.Random(1)
    assert [policy.delay(n, rng) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
