"""The synthetic shapes dataset: seeded, truthful captions, varied phrasing, a current data card."""

from pathlib import Path

import numpy as np
import pytest

from nirvana_quality import shapes

pytestmark = pytest.mark.timeout(120)


def test_examples_are_a_pure_function_of_seed_and_index():
    a, b = shapes.example(3, 17), shapes.example(3, 17)
    assert a == b and a.caption == b.caption
    assert np.array_equal(shapes.render(a.scene), shapes.render(b.scene))
    assert shapes.example(4, 17).caption != a.caption or shapes.example(4, 17).scene != a.scene


def test_render_is_64x64_rgb_and_shows_the_colour_and_background():
    scene = shapes.Scene("circle", "red", "large", "center", "one", "white", "filled")
    image = shapes.render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[32, 32]) == pytest.approx(shapes.COLOURS_RGB["red"], abs=20)
    assert tuple(image[2, 2]) == shapes.BACKGROUND_RGB["white"]
    left = shapes.render(shapes.Scene("circle", "red", "large", "left", "one", "white", "filled"))
    assert tuple(left[32, 16]) == pytest.approx(shapes.COLOURS_RGB["red"], abs=20)
    assert tuple(left[32, 48]) == shapes.BACKGROUND_RGB["white"]


def test_outlined_shapes_are_hollow():
    filled = shapes.render(shapes.Scene("square", "blue", "large", "center", "one", "black", "filled"))
    hollow = shapes.render(shapes.Scene("square", "blue", "large", "center", "one", "black", "outlined"))
    assert tuple(filled[32, 32]) != tuple(hollow[32, 32])
    assert tuple(hollow[32, 32]) == shapes.BACKGROUND_RGB["black"]


def test_captions_name_exactly_their_mentioned_attributes():
    for i in range(300):
        ex = shapes.example(0, i)
        text = ex.caption.lower()
        assert set(shapes.ALWAYS_MENTIONED) <= set(ex.mentioned)
        for name in ex.mentioned:
            value = getattr(ex.scene, name)
            phrases = shapes.SYNONYMS[name][value]
            if name == "shape" and ex.scene.count != "one":
                phrases = tuple(shapes.PLURAL[p] for p in phrases)
            if name == "count" and value == "one":
                continue  # "a"/"one" also occur as ordinary words
            assert any(p in text for p in phrases), (name, value, ex.caption)
        if "count" not in ex.mentioned:
            assert ex.scene.count == "one"  # an unnamed count is never a plural scene


def test_captions_vary_in_phrasing():
    captions = [shapes.example(0, i).caption for i in range(500)]
    assert len(set(captions)) > 480
    starts = {c.split(" ")[0] for c in captions}
    assert len(starts) > 8


def test_splits_are_disjoint():
    train = {shapes.example(0, i).caption for i in range(200)}
    held = {e.caption for e in shapes.split_examples("heldout", 0, 200)}
    assert shapes.SPLITS["train"][1] <= shapes.SPLITS["heldout"][0]
    assert len(train & held) < 5  # different examples; a short caption may recur by chance


def test_committed_data_card_is_current():
    card = Path(__file__).resolve().parents[2] / "quality" / "DATA_CARD.md"
    assert card.read_text() == shapes.data_card(), "regenerate: python -m nirvana_quality.shapes --card > quality/DATA_CARD.md"
