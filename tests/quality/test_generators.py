"""The exported repository as a generator: the server's step loop, resumption, and the harness on it."""

from pathlib import Path

import numpy as np
import pytest

from nirvana_quality import harness, metrics
from nirvana_quality.generators import RepositoryGenerator

pytestmark = pytest.mark.timeout(600)
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="module")
def generator():
    return RepositoryGenerator(REPOSITORY, threads=1)


def test_resuming_from_the_runs_own_state_reproduces_it(generator):
    prompts = ["a large red circle on the left", "two small blue squares at the top"]
    full = generator.generate(prompts, [1, 2], steps=10, save_steps=(4,))
    again = generator.generate(prompts, [1, 2], steps=10)
    assert np.array_equal(full.images, again.images)
    resumed = generator.generate(prompts, [1, 2], steps=10, start_step=4,
                                 start_latents=[c[4] for c in full.checkpoints])
    assert resumed.steps_run == [6, 6]
    assert np.all(metrics.psnr(resumed.images, full.images) > 40)
    swapped = generator.generate(prompts, [1, 2], steps=10, start_step=[4, 4],
                                 start_latents=[c[4] for c in reversed(full.checkpoints)])
    assert np.all(metrics.psnr(swapped.images, full.images) < 40)


def test_start_latents_are_required_when_resuming(generator):
    with pytest.raises(ValueError, match="start latent"):
        generator.generate(["a red circle"], [0], steps=10, start_step=4)


def test_harness_table_on_a_few_pairs(generator):
    pairs = harness.shapes_pairs(generator, per_band=1, candidates=80)
    assert pairs and all(0.5 <= p.similarity <= 1.0001 for p in pairs)
    run = harness.measure(generator, pairs[:4], ks=(3, 6), steps=8, batch_size=8)
    assert run.reference.shape == (len(run.pairs), 64, 64, 3)
    assert set(run.resumed) == {3, 6}
    rows = harness.rows_as_dicts(harness.summarize(run))
    assert {r["k"] for r in rows} == {3, 6}
    assert sum(r["n"] for r in rows if r["k"] == 3) == len(run.pairs)
    assert all(0.0 <= r["ssim"] <= 1.0 for r in rows)
    assert "| K |" in harness.markdown_table(rows)
