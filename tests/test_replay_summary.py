"""The warm replay's figures: throughput at exactly c in flight, occupancy, R and E."""

import pytest

from nirvana_perf.replay import Sample, compare_summary, efficiency, mode_summary

pytestmark = pytest.mark.timeout(30)


def sample(latency: float, status: str = "miss", start: int = 0, mode: str = "on") -> Sample:
    return Sample(index=0, mode=mode, status=status, start_step=start, steps=50, latency_s=latency, sent_at=0.0)


def test_throughput_at_c_is_littles_law_and_ignores_the_drain():
    # 8 in flight, 4 s each: 2 req/s at c=8, whatever the wall clock says (here a long drain).
    samples = [sample(4.0) for _ in range(16)]
    m = mode_summary(samples, seconds=10.0, concurrency=8)
    assert m["throughput_rps"] == pytest.approx(1.6)
    assert m["throughput_at_c_rps"] == pytest.approx(2.0)
    assert m["occupancy"] == pytest.approx(64.0 / 80.0)


def test_errors_do_not_count_and_open_loops_have_no_figure_at_c():
    samples = [sample(2.0), sample(2.0), sample(9.0, status="error")]
    assert mode_summary(samples, seconds=4.0, concurrency=2)["throughput_at_c_rps"] == pytest.approx(1.0)
    open_loop = mode_summary(samples, seconds=4.0)
    assert open_loop["throughput_at_c_rps"] is None and open_loop["occupancy"] is None


def test_compare_gives_r_and_e_both_ways():
    off = mode_summary([sample(5.0, "disabled", mode="off") for _ in range(8)], seconds=5.0, concurrency=8)
    # Half the requests resume at K=25: s = 25%; at c=8 they run 3.75 s on average instead of 5.
    on = mode_summary([sample(5.0) for _ in range(4)] + [sample(2.5, "approximate", 25) for _ in range(4)],
                      seconds=5.0, concurrency=8)
    cmp = compare_summary(on, off)
    assert cmp["s"] == pytest.approx(0.25)
    assert cmp["R"] == pytest.approx(1.0)  # same wall clock: the drain hides the gain
    assert cmp["R_at_c"] == pytest.approx(5.0 / 3.75)
    assert cmp["E_at_c"] == pytest.approx(1.0)
    assert efficiency(None, 0.2) is None and efficiency(1.25, 0.0) is None
