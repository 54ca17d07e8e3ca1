"""Threshold calibration from a quality table: the rule, and the committed thresholds follow it."""

import json

import pytest

from nirvana.config import CacheConfig, PipelineSpec
from nirvana_export import embedded
from nirvana_quality import harness

pytestmark = pytest.mark.timeout(60)


def row(k, low, drop, n=20):
    return {"k": k, "band_low": low, "n": n, "adherence_drop": drop}


def test_no_threshold_goes_below_the_floor():
    rows = table({5: {0.5: 0.0, 0.7: 0.0}, 25: {0.7: 0.0, 0.8: 0.0}})
    assert harness.calibrate(rows, floor=0.71) == [[0.71, 25]]  # K=5 is dominated once both sit at the floor
    assert harness.calibrate(rows, floor=0.0) == [[0.7, 25], [0.5, 5]]


def table(drops):
    """drops: {K: {band_low: drop}}"""
    return [row(k, low, d) for k, cells in drops.items() for low, d in cells.items()]


def test_each_k_gets_the_lowest_band_from_which_every_higher_band_passes():
    rows = table({10: {0.7: 0.05, 0.8: 0.0, 0.9: 0.005, 0.95: 0.0},
                  25: {0.7: 0.2, 0.8: 0.03, 0.9: 0.008, 0.95: 0.0}})
    assert harness.calibrate(rows, gate=0.01, floor=0.0) == [[0.9, 25], [0.8, 10]]


def test_a_failing_band_above_stops_the_descent():
    # 0.8 passes at K=10 but 0.9 above it fails: only 0.95 upward is trusted.
    rows = table({10: {0.8: 0.0, 0.9: 0.04, 0.95: 0.0}})
    assert harness.calibrate(rows, gate=0.01, floor=0.0) == [[0.95, 10]]


def test_a_k_that_fails_even_at_the_top_gets_no_threshold():
    rows = table({5: {0.7: 0.0, 0.95: 0.0}, 40: {0.7: 0.3, 0.95: 0.2}})
    assert harness.calibrate(rows, floor=0.0) == [[0.7, 5]]


def test_a_smaller_k_needing_as_much_similarity_as_a_larger_one_is_dropped():
    rows = table({10: {0.9: 0.0, 0.95: 0.0}, 20: {0.85: 0.0, 0.9: 0.0, 0.95: 0.0}})
    assert harness.calibrate(rows, floor=0.0) == [[0.85, 20]]


def test_a_larger_k_clearing_a_band_clears_the_smaller_ones_there():
    # K=5 is noisy at 0.9 (+2 points) where K=25 passes: resuming earlier cannot cost more.
    rows = table({5: {0.8: 0.0, 0.9: 0.02, 0.95: 0.0}, 25: {0.8: 0.05, 0.9: 0.0, 0.95: 0.0}})
    assert harness.calibrate(rows, floor=0.0) == [[0.9, 25], [0.8, 5]]


def test_thin_cells_are_ignored():
    rows = [row(10, 0.7, 0.0, n=2), row(10, 0.8, 0.0), row(10, 0.9, 0.0)]
    assert harness.calibrate(rows, min_pairs=5, floor=0.0) == [[0.8, 10]]


def test_gate_widens_the_table():
    rows = table({10: {0.7: 0.015, 0.8: 0.0}})
    assert harness.calibrate(rows, gate=0.01, floor=0.0) == [[0.8, 10]]
    assert harness.calibrate(rows, gate=0.02, floor=0.0) == [[0.7, 10]]


@pytest.mark.timeout(240)
def test_committed_calibration_is_what_the_tail_rule_gives_on_the_committed_records():
    """export/weights/calibration.json holds what `make calibrate` wrote: per false-hit target the
    thresholds and guard bounds of the tail rule, and (top level) the table that meets the
    default target unchecked, all recomputed here from the committed tail records."""
    from nirvana_quality import policies, tail

    data = json.loads((embedded.WEIGHTS_DIR / embedded.CALIBRATION).read_text())
    records = tail.load_records(embedded.WEIGHTS_DIR / "tail_records.jsonl")
    assert len(records) >= 1000, "the calibration needs the committed tail records"
    guard = data["guard"]
    assert guard["records"] == len(records) and guard["rule"] == policies.TAIL_CALIBRATION_RULE
    for key, committed in guard["targets"].items():
        again = policies.calibrate_tail(records, float(key))
        assert again["thresholds"] == committed["thresholds"] and again["guard"] == committed["guard"], key
    assert data["thresholds"] == policies.calibrate_unguarded(records, guard["default_target"])["thresholds"]
    assert embedded.calibrated_thresholds() == data["thresholds"]
    assert embedded.calibrated_guard() == guard


def test_model_thresholds_beyond_the_cache_steps_extend_them():
    spec = PipelineSpec("m", 4, 8, 8, 8, 384, 384, 77, thresholds=[[0.97, 35], [0.9, 20]])
    config = CacheConfig(thresholds=()).with_model_thresholds(spec)
    assert config.thresholds == ((0.97, 35), (0.9, 20))
    assert 35 in config.cache_steps and set((5, 10, 15, 20, 25)) <= set(config.cache_steps)
