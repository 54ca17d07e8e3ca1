"""The resume guard through the served ensemble: a one-attribute edit at high similarity keeps
the new attribute, framing words still resume late, and operators see what the guard did."""

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

SOURCE = "a large purple triangle in the center on a black background"
BACKGROUND_EDIT = "a large purple triangle in the center on a white background"  # similarity 0.945
NEAR_DUPLICATE = "a large purple triangle in the center on a black background, high quality"  # 0.972


@pytest.fixture(scope="module")
def scorer():
    from nirvana_export import embedded
    from nirvana_quality.scorer import load_scorer

    return load_scorer(embedded.WEIGHTS_DIR / embedded.SCORER_WEIGHTS)


def background_of(scorer, image) -> str:
    from nirvana_quality import shapes

    _, preds = scorer.read(image[None])
    return shapes.ATTRIBUTES["background"][int(preds["background"][0])]


def fallbacks(server, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "nirvana_guard_fallbacks_total" and s.labels.get("reason") == reason)


@pytest.mark.timeout(240)
def test_a_background_edit_keeps_its_background_and_framing_words_still_resume_late(
        client, server, scorer, served_start_step):
    tenant = f"guard-{client.protocol}"  # a namespace of its own: nothing else cached there
    source = client.generate(SOURCE, seed=5, tenant=tenant)
    assert source.cache_status == "miss" and source.admitted > 0
    assert background_of(scorer, source.image) == "black"

    before = fallbacks(server, "divergence")
    edit = client.generate(BACKGROUND_EDIT, seed=5, tenant=tenant)
    reference = client.generate(BACKGROUND_EDIT, seed=5, tenant=tenant, cache=False)
    assert edit.cache_status == "approximate" and edit.matched_prompt == SOURCE and edit.similarity > 0.9
    looked_up = served_start_step(edit.similarity, edit.steps)
    assert looked_up >= 15  # the thresholds alone would resume it late enough to keep the black background
    assert background_of(scorer, reference.image) == "white"
    assert background_of(scorer, edit.image) == "white", (edit.guard, edit.start_step)
    # The guard downgraded it: the response says so and START_STEP is where it really started.
    assert edit.guard == "downgraded:divergence" and edit.start_step < looked_up
    deadline = time.monotonic() + 10
    while fallbacks(server, "divergence") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fallbacks(server, "divergence") >= before + 1

    near = client.generate(NEAR_DUPLICATE, seed=5, tenant=tenant)
    assert near.cache_status == "approximate" and near.similarity > 0.95
    assert near.guard == "passed" and near.start_step >= 25
    assert background_of(scorer, near.image) == "black"
