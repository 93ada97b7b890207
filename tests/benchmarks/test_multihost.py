"""The pure arithmetic of benchmarks/multihost.py: the send rates a campaign's figure is made of, and
how a figure is judged against its target."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "multihost.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script loaded as a module (it is run by path, not installed), sys.path left as it was."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("benchmarks_multihost", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_steady_rate_leaves_out_each_accounts_first_send(bench: ModuleType) -> None:
    """Three accounts' opening burst at t=0, then one send every 0.5 s until t=2: 4 sends over 2 s is
    2/s, not 7 over 2 s; the order the times come in does not matter."""
    times = [2.0, 0.0, 0.5, 0.0, 1.5, 0.0, 1.0]
    assert bench.steady_rate(times, 3) == pytest.approx(2.0)


def test_steady_rate_is_zero_without_sends_past_the_burst(bench: ModuleType) -> None:
    """No send beyond each account's first (or all at one instant) gives 0, never a division by zero."""
    assert bench.steady_rate([0.0, 0.1, 0.2], 3) == 0.0
    assert bench.steady_rate([], 0) == 0.0
    assert bench.steady_rate([1.0, 1.0, 1.0], 1) == 0.0


def test_campaign_fraction_is_the_rate_while_every_account_sent_over_the_summed_ceiling(bench: ModuleType) -> None:
    """30 accounts at 2/s have a 60/s ceiling: 57/s while all sent is 0.95 of it, whatever the rate
    from the first send to the last (54/s, 0.9), which is printed beside it."""
    result = bench.CampaignResult(accounts=30, rate=2.0, recipients=1800, sent=1800, status="completed",
                                  steady=54.0, elapsed=31.0, rejections=0, duplicates=0, all_sending=57.0,
                                  window=25.0, spread=0.5)
    assert result.ceiling == 60.0
    assert result.fraction == pytest.approx(0.95)
    assert result.first_to_last == pytest.approx(0.9)


def test_the_rate_while_every_account_sent_leaves_out_the_start_and_the_tail(bench: ModuleType) -> None:
    """Account 1 sends at 0, 1, 2, 3, 4; account 2 starts late (0.5) and stops early (2.5): the window
    is 0.5 to 2.5, holding the sends at 1, 1.5, 2 and 2.5 (the one at 0.5 opens it): 2/s; the first
    sends spread over 0.5 s; a window that never opens gives 0."""
    sends = [(1, float(t)) for t in range(5)] + [(2, 0.5), (2, 1.5), (2, 2.5)]
    assert bench.all_sending_rate(sends) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(0.5))
    assert bench.all_sending_rate([(1, 0.0), (1, 1.0), (2, 2.0)]) == (0.0, 0.0, 2.0)
    assert bench.all_sending_rate([]) == (0.0, 0.0, 0.0)


def test_a_figure_passes_at_its_target_and_misses_past_it(bench: ModuleType) -> None:
    """`at_least` targets pass from the target up, `at_most` ones up to it; a figure not measured says
    so whatever its target, and one without a target has no verdict."""
    figure = bench.Figure
    assert figure("f", 0.95, "", 0.95).verdict == "pass"
    assert figure("f", 0.949, "", 0.95).verdict == "MISS"
    assert figure("p99", 50.0, "", 50, at_least=False).verdict == "pass"
    assert figure("p99", 50.1, "", 50, at_least=False).verdict == "MISS"
    assert figure("f", None, "-", 0.95).verdict == "not measured"
    assert figure("size", 155.0, "155 B").verdict == "-"
    assert figure("p99", 1.0, "", 50, at_least=False).target_text == "<= 50"
