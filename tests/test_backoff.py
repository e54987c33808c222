"""Retry delays (DESIGN section 2): ``base_delay * 2**(n-1)``, capped, fixed, optional jitter."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgflow_py.backoff import retry_delay

base_delays = st.one_of(
    st.integers(min_value=0, max_value=10_000),
    st.floats(min_value=0, max_value=10_000, allow_nan=False, allow_infinity=False),
)
max_delays = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
attempts = st.integers(min_value=1, max_value=200)


# --- exponential ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 11))
def test_exponential_delay_doubles_from_base_delay(n: int) -> None:
    assert retry_delay(n, base_delay=1, max_delay=10**9) == 2 ** (n - 1)
    assert retry_delay(n, base_delay=5, max_delay=10**9) == 5 * 2 ** (n - 1)
    assert retry_delay(n, base_delay=0.25, max_delay=10**9) == 0.25 * 2 ** (n - 1)


def test_first_retry_waits_base_delay_not_double() -> None:
    # The pgflow SQL uses 2**n (off by one); the contract is 2**(n-1).
    assert retry_delay(1, base_delay=60) == 60
    assert retry_delay(2, base_delay=60) == 120
    assert retry_delay(3, base_delay=60) == 240


def test_exponential_is_the_default_backoff() -> None:
    assert retry_delay(4, base_delay=3) == retry_delay(4, base_delay=3, backoff="exponential") == 24


def test_default_max_delay_is_one_hour() -> None:
    assert retry_delay(13, base_delay=1) == 3600  # 2**12 = 4096 > 3600
    assert retry_delay(12, base_delay=1) == 2048


def test_max_delay_caps_the_exponential_delay() -> None:
    delays = [retry_delay(n, base_delay=1, max_delay=10) for n in range(1, 8)]
    assert delays == [1, 2, 4, 8, 10, 10, 10]


def test_max_delay_zero_means_retry_at_once() -> None:
    assert retry_delay(5, base_delay=30, max_delay=0) == 0


def test_zero_base_delay_is_zero_for_any_attempt() -> None:
    assert retry_delay(1, base_delay=0) == 0
    assert retry_delay(10_000, base_delay=0) == 0


@given(n=attempts, base=base_delays, cap=max_delays)
def test_exponential_matches_the_formula(n: int, base: float, cap: float) -> None:
    expected = min(base * 2.0 ** (n - 1), cap)
    assert retry_delay(n, base_delay=base, max_delay=cap) == pytest.approx(expected)


@given(n=attempts, base=base_delays, cap=max_delays)
def test_exponential_never_decreases_and_never_exceeds_the_cap(
    n: int, base: float, cap: float
) -> None:
    d1 = retry_delay(n, base_delay=base, max_delay=cap)
    d2 = retry_delay(n + 1, base_delay=base, max_delay=cap)
    assert 0 <= d1 <= d2 <= cap


@pytest.mark.parametrize("n", [1_024, 1_025, 10**6, 10**18, 10**100])
def test_huge_attempt_numbers_do_not_overflow(n: int) -> None:
    delay = retry_delay(n, base_delay=1, max_delay=3600)
    assert delay == 3600
    assert math.isfinite(delay)
    assert retry_delay(n, base_delay=1e300, max_delay=7) == 7


# --- fixed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000])
def test_fixed_backoff_waits_base_delay_every_time(n: int) -> None:
    assert retry_delay(n, base_delay=7, backoff="fixed") == 7


def test_fixed_backoff_is_capped_by_max_delay() -> None:
    assert retry_delay(3, base_delay=100, backoff="fixed", max_delay=30) == 30


@given(n=attempts, base=base_delays)
def test_fixed_backoff_is_constant(n: int, base: float) -> None:
    assert retry_delay(n, base_delay=base, backoff="fixed", max_delay=1e9) == base


# --- jitter --------------------------------------------------------------------------------------


@given(
    n=attempts,
    base=base_delays,
    cap=max_delays,
    backoff=st.sampled_from(["exponential", "fixed"]),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jitter_stays_within_half_and_full_delay(
    n: int, base: float, cap: float, backoff: str, seed: int
) -> None:
    plain = retry_delay(n, base_delay=base, backoff=backoff, max_delay=cap)  # type: ignore[arg-type]
    jittered = retry_delay(
        n, base_delay=base, backoff=backoff, max_delay=cap,  # type: ignore[arg-type]
        jitter=True, rng=random.Random(seed),
    )
    assert 0.5 * plain - 1e-9 <= jittered <= plain + 1e-9


def test_jitter_with_a_seeded_rng_is_reproducible() -> None:
    a = [retry_delay(n, base_delay=10, jitter=True, rng=random.Random(1234)) for n in range(1, 6)]
    b = [retry_delay(n, base_delay=10, jitter=True, rng=random.Random(1234)) for n in range(1, 6)]
    assert a == b
    expected = [10 * 2 ** (n - 1) * random.Random(1234).uniform(0.5, 1.0) for n in range(1, 6)]
    assert a == pytest.approx(expected)


def test_jitter_spreads_delays_over_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [retry_delay(3, base_delay=10, jitter=True, rng=rng) for _ in range(2000)]
    assert all(20 <= d <= 40 for d in delays)
    # Uniform over [20, 40]: both halves are hit and values are not all the same.
    assert min(delays) < 21
    assert max(delays) > 39
    assert len(set(delays)) > 1900


def test_jitter_applies_to_the_capped_delay() -> None:
    rng = random.Random(0)
    delays = [
        retry_delay(50, base_delay=1, max_delay=100, jitter=True, rng=rng) for _ in range(500)
    ]
    assert all(50 <= d <= 100 for d in delays)


def test_no_jitter_by_default() -> None:
    assert {retry_delay(4, base_delay=2) for _ in range(50)} == {16}


def test_jitter_with_rng_does_not_touch_the_global_random_state() -> None:
    state = random.getstate()
    retry_delay(2, base_delay=3, jitter=True, rng=random.Random(5))
    assert random.getstate() == state


def test_jitter_without_rng_still_in_bounds() -> None:
    for _ in range(200):
        assert 4 <= retry_delay(2, base_delay=4, jitter=True) <= 8


# --- invalid input -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -100])
def test_failed_attempts_is_one_based(n: int) -> None:
    with pytest.raises(ValueError, match="1-based"):
        retry_delay(n, base_delay=1)


@pytest.mark.parametrize("n", [0, -1])
def test_failed_attempts_is_checked_for_fixed_backoff_too(n: int) -> None:
    with pytest.raises(ValueError):
        retry_delay(n, base_delay=1, backoff="fixed")
