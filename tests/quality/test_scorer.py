"""The committed attribute scorer reads held-out rendered images, and adherence counts named attributes only."""

import numpy as np
import pytest

from nirvana_export import embedded
from nirvana_quality import scorer, shapes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model():
    return scorer.load_scorer(embedded.WEIGHTS_DIR / embedded.SCORER_WEIGHTS)


def test_per_attribute_accuracy_on_held_out_renders_is_at_least_095(model):
    scenes = scorer.heldout_scenes(seed=0, count=600)
    images = shapes.render_batch([shapes.Example(s, "", ()) for s in scenes])
    accuracy = scorer.attribute_accuracy(model, images, scenes)
    assert set(accuracy) == set(shapes.ATTRIBUTES)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_adherence_is_the_fraction_of_named_attributes_shown(model):
    scene = shapes.Scene("circle", "red", "large", "left", "one", "white", "filled")
    image = shapes.render_batch([shapes.Example(scene, "", ())])
    right = shapes.Example(scene, "a red circle", ("shape", "colour"))
    wrong_colour = shapes.Example(shapes.Scene("circle", "blue", "large", "left", "one", "white", "filled"),
                                  "a blue circle", ("shape", "colour"))
    half = shapes.Example(shapes.Scene("square", "red", "large", "left", "one", "white", "filled"),
                          "a red square on the left", ("shape", "colour", "position"))
    scores = model.adherence(np.concatenate([image] * 3), [right, wrong_colour, half])
    assert scores.tolist() == pytest.approx([1.0, 0.5, 2 / 3])


def test_features_separate_different_scenes(model):
    a = shapes.render_batch([shapes.Example(shapes.Scene("circle", "red", "large", "left", "one", "white", "filled"), "", ())])
    b = shapes.render_batch([shapes.Example(shapes.Scene("square", "blue", "small", "right", "three", "black", "outlined"), "", ())])
    feats, _ = model.read(np.concatenate([a, a, b]))
    assert feats.shape == (3, scorer.FEATURE_DIM)
    assert np.linalg.norm(feats[0] - feats[1]) < 1e-5 < np.linalg.norm(feats[0] - feats[2])


def test_wrong_image_size_is_refused(model):
    with pytest.raises(ValueError, match="uint8"):
        model.read(np.zeros((1, 32, 32, 3), np.uint8))
