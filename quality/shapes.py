"""A procedural captioned dataset: 64x64 images of shapes whose attributes a caption names.

Every image is a :class:`Scene` (one value per attribute), rendered with PIL at 4x
size and downsampled, so edges are antialiased like a photo's. A caption names
the shape and colour always and each other attribute with probability
:data:`MENTION_PROBABILITY`, in one of several phrasings (templates, synonyms,
word orders, optional framing words), so MiniLM similarities between captions
spread from unrelated to near-duplicate, as on real prompt logs. Everything is
seeded: ``(seed, index)`` always gives the same scene, image and caption.

The scorer (:mod:`nirvana_quality.scorer`) checks the same attributes in an
image, so "the image shows what the prompt says" is measurable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# Attribute -> its values. The order of values is the scorer's class order: do not reorder.
ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow", "purple"),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom", "center"),
    "count": ("one", "two", "three"),
    "background": ("black", "white", "striped"),
    "style": ("filled", "outlined"),
}
# Always named: a caption without its object says nothing drawable.
ALWAYS_MENTIONED = ("shape", "colour")
MENTION_PROBABILITY = 0.5

COLOURS_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
               "yellow": (240, 220, 40), "purple": (150, 50, 200)}
BACKGROUND_RGB = {"black": (15, 15, 15), "white": (240, 240, 240)}
STRIPE_RGB = ((90, 90, 90), (170, 170, 170))
STRIPE_PERIOD = 16  # pixels at 64x64: two latent pixels, so an 8x-downsampling VAE can carry it
RADIUS = {"small": 6.0, "large": 10.0}
OUTLINE_WIDTH = 2.5

# Phrasings. Each value has several synonyms; captions pick one at random.
SYNONYMS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "shape": {"circle": ("circle", "disc", "dot", "round shape"),
              "square": ("square", "box", "block"),
              "triangle": ("triangle", "three-sided shape", "pyramid shape")},
    "colour": {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "lime green"),
               "blue": ("blue", "azure", "cobalt blue"), "yellow": ("yellow", "golden", "lemon yellow"),
               "purple": ("purple", "violet", "magenta")},
    "size": {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")},
    "position": {"left": ("on the left", "at the left side", "in the left half"),
                 "right": ("on the right", "at the right side", "in the right half"),
                 "top": ("at the top", "near the top edge", "in the upper half"),
                 "bottom": ("at the bottom", "near the bottom edge", "in the lower half"),
                 "center": ("in the center", "in the middle", "centered")},
    "count": {"one": ("a", "one", "a single"), "two": ("two", "a pair of", "2"),
              "three": ("three", "a group of three", "3")},
    "background": {"black": ("on a black background", "against a dark background", "on black"),
                   "white": ("on a white background", "against a bright white backdrop", "on white"),
                   "striped": ("on a striped background", "over grey stripes", "with a striped backdrop")},
    "style": {"filled": ("solid", "filled", "flat"), "outlined": ("outlined", "hollow", "line-drawn")},
}
PLURAL = {"circle": "circles", "disc": "discs", "dot": "dots", "round shape": "round shapes",
          "square": "squares", "box": "boxes", "block": "blocks", "triangle": "triangles",
          "three-sided shape": "three-sided shapes", "pyramid shape": "pyramid shapes"}
PREFIXES = ("", "", "a picture of ", "an illustration of ", "a drawing of ", "digital art, ",
            "minimalist poster: ", "a simple render of ")
SUFFIXES = ("", "", "", ", high quality", ", simple geometric art", ", 4k", ", trending on artstation")


@dataclass(frozen=True)
class Scene:
    """One image's attribute values (each a value of :data:`ATTRIBUTES`) and its layout jitter."""

    shape: str
    colour: str
    size: str
    position: str
    count: str
    background: str
    style: str
    jitter: Tuple[float, ...] = field(default=(0.0, 0.0, 0.0, 0.0), compare=False)

    def values(self) -> Dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def labels(self) -> Dict[str, int]:
        """Class index per attribute (the scorer's targets)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


@dataclass(frozen=True)
class Example:
    """A rendered scene and a caption naming some of its attributes."""

    scene: Scene
    caption: str
    mentioned: Tuple[str, ...]

    def to_json(self) -> dict:
        return {"caption": self.caption, "mentioned": list(self.mentioned), **self.scene.values()}


def sample_scene(rng: np.random.Generator, fixed: Optional[Dict[str, str]] = None) -> Scene:
    """A scene with uniform attribute values, except those given in ``fixed``."""
    fixed = fixed or {}
    values = {name: fixed.get(name) or options[rng.integers(len(options))] for name, options in ATTRIBUTES.items()}
    return Scene(**values, jitter=tuple(float(x) for x in rng.uniform(-1.0, 1.0, size=4)))


def object_centres(scene: Scene) -> List[Tuple[float, float]]:
    """Pixel centres (x, y) at 64x64: objects spread evenly along the region's axis, never overlapping."""
    n = ATTRIBUTES["count"].index(scene.count) + 1
    along = [(i + 0.5) * IMAGE_SIZE / n for i in range(n)]
    jx, jy = scene.jitter[0] * 2.0, scene.jitter[1] * 2.0
    fixed = {"left": 16.0, "right": 48.0, "top": 16.0, "bottom": 48.0, "center": 32.0}[scene.position]
    if scene.position in ("left", "right"):
        return [(fixed + jx, a + jy * 0.5) for a in along]
    return [(a + jx * 0.5, fixed + jy) for a in along]


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 RGB [64, 64, 3]."""
    size = IMAGE_SIZE * SUPERSAMPLE
    if scene.background == "striped":
        image = Image.new("RGB", (size, size), STRIPE_RGB[0])
        draw = ImageDraw.Draw(image)
        period = STRIPE_PERIOD * SUPERSAMPLE
        for x in range(-size, size, period):  # diagonal stripes, half a period wide
            draw.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + size, size), (x + size, size)],
                         fill=STRIPE_RGB[1])
    else:
        image = Image.new("RGB", (size, size), BACKGROUND_RGB[scene.background])
        draw = ImageDraw.Draw(image)
    colour = tuple(int(np.clip(c + 12 * scene.jitter[2], 0, 255)) for c in COLOURS_RGB[scene.colour])
    radius = (RADIUS[scene.size] + 0.6 * scene.jitter[3]) * SUPERSAMPLE
    width = int(round(OUTLINE_WIDTH * SUPERSAMPLE))
    for cx, cy in object_centres(scene):
        cx, cy = cx * SUPERSAMPLE, cy * SUPERSAMPLE
        fill = colour if scene.style == "filled" else None
        outline_width = 0 if scene.style == "filled" else width
        if scene.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill, outline=colour,
                         width=outline_width)
        elif scene.shape == "square":
            r = radius * 0.9  # equal area-ish with the circle
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=colour, width=outline_width)
        else:
            r = radius * 1.15
            points = [(cx, cy - r), (cx + r * 0.866 * 1.1, cy + r * 0.6), (cx - r * 0.866 * 1.1, cy + r * 0.6)]
            if fill:
                draw.polygon(points, fill=fill)
            else:
                draw.polygon(points, outline=colour, width=outline_width)
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def caption(scene: Scene, mentioned: Sequence[str], rng: np.random.Generator) -> str:
    """A natural caption naming exactly the attributes in ``mentioned``."""
    words = {name: _choice(rng, SYNONYMS[name][getattr(scene, name)]) for name in mentioned}
    adjectives = [words[a] for a in ("size", "style") if a in words]
    if rng.random() < 0.5:
        adjectives.reverse()
    adjectives.append(words["colour"])
    plural = "count" in words and scene.count != "one"
    noun = PLURAL[words["shape"]] if plural else words["shape"]
    phrase = " ".join(adjectives + [noun])
    if "count" in words:
        quantity = words["count"]
        phrase = f"{_article(phrase)} {phrase}" if quantity == "a" else f"{quantity} {phrase}"
    else:
        phrase = f"{_article(phrase)} {phrase}"
    extras = [words[a] for a in ("position", "background") if a in words]
    if len(extras) == 2 and rng.random() < 0.5:
        extras.reverse()
    order = rng.integers(3)
    if extras and order == 1:  # "on black, a red circle": no framing prefix in front of this order
        return f"{extras[0]}, {phrase}" + (f" {extras[1]}" if len(extras) > 1 else "") + _choice(rng, SUFFIXES)
    if extras and order == 2:
        text = f"{phrase}, " + ", ".join(extras)
    else:
        text = " ".join([phrase] + extras)
    return f"{_choice(rng, PREFIXES)}{text}{_choice(rng, SUFFIXES)}"


def choose_mentioned(rng: np.random.Generator) -> Tuple[str, ...]:
    optional = [a for a in ATTRIBUTES if a not in ALWAYS_MENTIONED and rng.random() < MENTION_PROBABILITY]
    return tuple(list(ALWAYS_MENTIONED) + optional)


def example(seed: int, index: int) -> Example:
    """The dataset's example ``index`` for ``seed`` (pure function of both)."""
    rng = np.random.default_rng([seed, index])
    mentioned = choose_mentioned(rng)
    # An unnamed count reads as "a <shape>": one object, so that no caption is false.
    scene = sample_scene(rng, None if "count" in mentioned else {"count": "one"})
    return Example(scene=scene, caption=caption(scene, mentioned, rng), mentioned=mentioned)


def variant(base: Example, change: Dict[str, str], rng: np.random.Generator, rephrase: bool = True,
            mention: Sequence[str] = ()) -> Example:
    """``base`` with some attribute values changed (and named), rephrased or not."""
    values = {**base.scene.values(), **change}
    scene = Scene(**values, jitter=base.scene.jitter)
    mentioned = tuple(dict.fromkeys(list(base.mentioned) + list(change) + list(mention)))
    text = caption(scene, mentioned, rng) if rephrase else base.caption
    return Example(scene=scene, caption=text, mentioned=mentioned)


def near_duplicate(text: str, rng: np.random.Generator) -> str:
    """``text`` with its framing changed (a suffix added or swapped), naming the same attributes."""
    for suffix in SUFFIXES:
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    options = [s for s in SUFFIXES if s] + [", detailed", ", centered composition", ", clean lines"]
    return text + options[rng.integers(len(options))]


def render_batch(examples: Sequence[Example]) -> np.ndarray:
    return np.stack([render(e.scene) for e in examples]) if examples else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                                                   np.uint8)


# Dataset splits: disjoint index ranges of one seed, so held-out captions never appear in training.
SPLITS = {"train": (0, 1_000_000), "heldout": (1_000_000, 1_100_000)}


def split_examples(split: str, seed: int, count: int) -> List[Example]:
    start, end = SPLITS[split]
    if count > end - start:
        raise ValueError(f"split {split} holds {end - start} examples, not {count}")
    return [example(seed, start + i) for i in range(count)]


def data_card() -> str:
    """The dataset's data card (markdown), generated from the constants above."""
    combos = int(np.prod([len(v) for v in ATTRIBUTES.values()]))
    lines = ["# Synthetic shapes dataset: data card", "",
             "Generated by `nirvana_quality.shapes` (procedural, seeded, no download). "
             "Regenerate this card with `python -m nirvana_quality.shapes --card`.", "",
             f"- Images: {IMAGE_SIZE}x{IMAGE_SIZE} RGB, drawn with PIL at {SUPERSAMPLE}x and downsampled (Lanczos).",
             f"- Scenes: one value per attribute, uniform; {combos} attribute combinations, plus layout, "
             "size and colour jitter.",
             "- Count: a caption that does not name the count shows one object (\"a red circle\" is never two).",
             f"- Captions: always name {' and '.join(ALWAYS_MENTIONED)}; every other attribute with probability "
             f"{MENTION_PROBABILITY}. Varied phrasing: {len(PREFIXES)} prefixes, {len(SUFFIXES)} suffixes, three word "
             "orders, synonyms below.",
             "- Splits: `train` = indices 0..999,999 and `heldout` = 1,000,000..1,099,999 of the same seed.",
             "- Labels: every attribute of every image (the scorer's targets); `mentioned` lists what the caption names.",
             "", "| attribute | values | phrasings |", "|---|---|---|"]
    for name, values in ATTRIBUTES.items():
        phrasings = "; ".join(f"{v}: " + ", ".join(f"\"{s}\"" for s in SYNONYMS[name][v]) for v in values)
        lines.append(f"| {name} | {', '.join(values)} | {phrasings} |")
    lines += ["", "Layout: objects are spread evenly along the vertical axis (left, right) or the horizontal "
              f"axis (top, bottom, center) of their region, never overlapping. Radii: small "
              f"{RADIUS['small']:g} px, large {RADIUS['large']:g} px (+-0.6); outlines {OUTLINE_WIDTH:g} px; "
              f"stripes: diagonal, period {STRIPE_PERIOD} px.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Write the synthetic shapes data card, or sample examples.")
    parser.add_argument("--card", action="store_true", help="print the data card")
    parser.add_argument("--samples", type=int, default=0, help="write N examples (PNG + JSON lines) to --output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("build/shapes_samples"))
    args = parser.parse_args(argv)
    if args.card:
        sys.stdout.write(data_card())
    if args.samples:
        args.output.mkdir(parents=True, exist_ok=True)
        examples = split_examples("train", args.seed, args.samples)
        with open(args.output / "captions.jsonl", "w") as f:
            for i, ex in enumerate(examples):
                Image.fromarray(render(ex.scene)).save(args.output / f"{i:05d}.png")
                f.write(json.dumps({"file": f"{i:05d}.png", **ex.to_json()}) + "\n")
        print(f"wrote {len(examples)} examples to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
