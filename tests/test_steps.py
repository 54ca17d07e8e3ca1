import pytest

from nirvana.steps import scale_steps, start_step_for

PAPER = ((0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5))


def test_paper_steps_at_fifty():
    assert scale_steps((5, 10, 15, 20, 25), 50, 50) == (5, 10, 15, 20, 25)


def test_steps_scale_with_request_steps():
    assert scale_steps((5, 10, 15, 20, 25), 50, 20) == (2, 4, 6, 8, 10)
    assert scale_steps((5, 10, 15, 20, 25), 50, 4) == (1, 2)  # duplicates merge, 0 dropped
    assert scale_steps((5, 10), 50, 1) == ()


@pytest.mark.parametrize("similarity, expected", [
    (1.0, 25), (0.95, 25), (0.949, 20), (0.90, 20), (0.86, 15), (0.80, 10), (0.70, 5), (0.649, 0), (-1.0, 0)])
def test_paper_thresholds(similarity, expected):
    assert start_step_for(similarity, PAPER, 50, 50) == expected


def test_thresholds_scale_with_steps():
    assert start_step_for(0.97, PAPER, 50, 30) == 15
    assert start_step_for(0.97, PAPER, 50, 1) == 0  # nothing to skip in a 1-step run
