"""The synthetic world: scenes of coloured shapes with exact ground truth.

Every scene is drawn from a seeded generator, so the same (seed, index) always gives the same
image, objects, captions and questions. Because the ground truth is exact, hallucination can be
measured exactly (see stages/metrics.py).

A scene has `min_objects` to `max_objects` objects, each in its own cell of a 3x3 grid, each with a shape, a
colour and a size, on a plain background. Captions come in several lengths from the same scene:

- short: the (up to) two largest objects by colour and shape ("a red circle and a blue square");
- medium: every object by colour and shape, and the background;
- long: every object with size, colour and place, and the background;
- raw: noisy alt-text as found on the web: generic, repetitive, sometimes naming an absent object.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from datamodules.text_stats import word_count

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
# Colours beyond the default seven, used when `world.palette` asks for more (harder to tell apart).
EXTRA_COLOURS = {"pink": (240, 130, 180), "cyan": (40, 200, 210), "lime": (160, 220, 40)}
BACKGROUNDS = {"gray": (110, 110, 110), "black": (15, 15, 15), "brown": (100, 70, 40)}
SIZES = ("small", "large")
# Grid cells in reading order; the phrase names the place in long captions.
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_KINDS = ("short", "medium", "long")


@dataclass
class WorldConfig:
    """How the synthetic world is drawn. Changing any field changes every image and caption."""

    image_size: int = 64
    """Side of the square images, in pixels."""
    max_objects: int = 4
    """The most objects in a scene (at most 9, one per grid cell)."""
    train_size: int = 20000
    val_size: int = 256
    test_size: int = 256
    raw_hallucination_rate: float = 0.3
    """Share of raw captions that name an object which is not in the image."""
    # Difficulty knobs; the defaults draw the easy world that the tiny curriculum learns almost perfectly.
    min_objects: int = 1
    """Objects per scene are drawn uniformly from min_objects..max_objects."""
    object_scale: float = 1.0
    """Object radius relative to the default (large 0.42, small 0.24 of a grid cell)."""
    overlap: float = 0.0
    """Extra position jitter, in grid cells: above about 0.1 objects spill into neighbouring cells and overlap.
    Each centre stays in its own cell, and no object is more than half hidden (`render` draws such a scene again
    with less jitter)."""
    texture: float = 0.0
    """Distractor strokes in object colours drawn on the background, per pixel of image area x 0.01."""
    palette: int = 7
    """Colours in use: the default 7, then pink, cyan and lime (up to 10)."""
    held_out_pairs: int = 0
    """(colour, shape) combinations that never appear outside val/test: rare combinations for the probes."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_objects <= len(PLACES):  # before min_objects, whose check reads it
            raise ValueError(f"world.max_objects must be in 1..{len(PLACES)}, got {self.max_objects}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"world.min_objects must be in 1..max_objects, got {self.min_objects}")
        if not 0 < self.object_scale <= 1.2 or self.overlap < 0 or self.texture < 0:
            raise ValueError("world.object_scale must be in (0, 1.2]; world.overlap and world.texture non-negative")
        if not 2 <= self.palette <= len(COLOURS) + len(EXTRA_COLOURS):
            raise ValueError(f"world.palette must be in 2..{len(COLOURS) + len(EXTRA_COLOURS)}, got {self.palette}")
        if not 0 <= self.held_out_pairs <= len(SHAPES) * self.palette // 4:
            raise ValueError(f"world.held_out_pairs must be in 0..{len(SHAPES) * self.palette // 4}")
        if not 0 <= self.raw_hallucination_rate <= 1:
            raise ValueError(f"world.raw_hallucination_rate must be in [0, 1], got {self.raw_hallucination_rate}")
        if self.image_size < 24:
            raise ValueError(f"world.image_size must be at least 24 pixels, got {self.image_size}")
        for name in ("train_size", "val_size", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"world.{name} must be positive, got {getattr(self, name)}")


def palette(config: WorldConfig) -> list[str]:
    """The colour names in use, in a fixed order."""
    return [*COLOURS, *EXTRA_COLOURS][: config.palette]


def colour_rgb(name: str) -> tuple[int, int, int]:
    return COLOURS.get(name) or EXTRA_COLOURS[name]


def held_out(config: WorldConfig, seed: int) -> set[tuple[str, str]]:
    """The (colour, shape) pairs kept out of training and pretraining scenes; never every colour of a shape
    (a training scene could then draw no colour for it). A draw that bans one is drawn again."""
    if not config.held_out_pairs:
        return set()
    colours = palette(config)
    pairs = [(c, s) for c in colours for s in SHAPES]
    for attempt in range(1000):
        stream = f"{seed}/held-out" + (f"/{attempt}" if attempt else "")  # the first draw as it always was
        banned = set(random.Random(stream).sample(pairs, config.held_out_pairs))
        if all(any((c, s) not in banned for c in colours) for s in SHAPES):
            return banned
    raise ValueError(f"world.held_out_pairs {config.held_out_pairs}: no draw leaves every shape a colour")


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    cell: int  # index into PLACES

    @property
    def place(self) -> str:
        return PLACES[self.cell]


@dataclass
class Scene:
    key: str
    background: str
    objects: list[WorldObject]
    raw_caption: str = ""
    questions: list[dict] = field(default_factory=list)

    def captions(self) -> dict[str, str]:
        return {kind: caption(self, kind) for kind in CAPTION_KINDS}

    def metadata(self) -> dict:
        """The JSON stored beside the image in a shard: ground truth, captions and probes."""
        captions = self.captions()
        return {
            "key": self.key,
            "background": self.background,
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "place": o.place} for o in self.objects],
            "captions": captions,
            "caption_words": {kind: word_count(text) for kind, text in captions.items()},
            "raw_caption": self.raw_caption,
            "questions": self.questions,
        }


def _phrase(obj: WorldObject, with_size: bool, with_place: bool) -> str:
    words = ["a"] + ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    if with_place:
        words += ["in", "the", obj.place] if obj.place == "center" else ["at", "the", obj.place]
    return " ".join(words)


def caption(scene: Scene, kind: str) -> str:
    """The caption of `kind` ("short", "medium" or "long") for a scene."""
    by_size = sorted(scene.objects, key=lambda o: (o.size != "large", o.cell))
    if kind == "short":
        return " and ".join(_phrase(o, False, False) for o in by_size[:2])
    if kind == "medium":
        body = " and ".join(_phrase(o, False, False) for o in by_size)
        return f"{body} on a {scene.background} background"
    if kind == "long":
        body = " and ".join(_phrase(o, True, True) for o in sorted(scene.objects, key=lambda o: o.cell))
        return f"{body} on a {scene.background} background"
    raise ValueError(f"unknown caption kind {kind!r}; expected one of {CAPTION_KINDS}")


def _raw_caption(scene: Scene, rng: random.Random, hallucination_rate: float, colours: list[str]) -> str:
    """Alt-text-like noise: generic phrases, repetitions, and sometimes an absent object."""
    generic = rng.choice(["a picture of shapes", "image", "shapes shapes shapes", "colorful shapes on a background"])
    words = [generic]
    if rng.random() < 0.5:
        words.append(_phrase(rng.choice(scene.objects), False, False))
    if rng.random() < hallucination_rate:
        present = {(o.colour, o.shape) for o in scene.objects}
        absent = [(c, s) for c in colours for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
        words.append(f"a {colour} {shape}")
    return " ".join(words)


def _questions(scene: Scene, rng: random.Random, colours: list[str]) -> list[dict]:
    """Yes/no probes (one present, one absent object), a count and an attribute question."""
    obj = rng.choice(scene.objects)
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in colours for s in SHAPES if (c, s) not in present]
    colour, shape = rng.choice(absent)
    same_shape = sum(o.shape == obj.shape for o in scene.objects)
    if same_shape == 1:
        attribute = {"type": "colour", "question": f"what color is the {obj.shape} ?", "answer": obj.colour}
    else:
        attribute = {
            "type": "count",
            "question": f"how many {obj.shape}s are there ?",
            "answer": NUMBER_WORDS[same_shape],
        }
    return [
        {"type": "yes_no", "question": f"is there a {obj.colour} {obj.shape} ?", "answer": "yes"},
        {"type": "yes_no", "question": f"is there a {colour} {shape} ?", "answer": "no"},
        {"type": "count", "question": "how many shapes are there ?", "answer": NUMBER_WORDS[len(scene.objects)]},
        attribute,
    ]


def make_scene(config: WorldConfig, seed: int, split: str, index: int) -> Scene:
    """The scene number `index` of `split`: a pure function of its arguments."""
    rng = random.Random(f"{seed}/{split}/{index}")
    colours = palette(config)
    banned = held_out(config, seed) if split not in ("val", "test") else set()
    count = rng.randint(config.min_objects, config.max_objects)
    cells = rng.sample(range(len(PLACES)), count)
    objects = []
    for cell in cells:
        obj = WorldObject(rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES), cell)
        while (obj.colour, obj.shape) in banned:
            obj = WorldObject(obj.shape, rng.choice(colours), obj.size, cell)
        objects.append(obj)
    scene = Scene(key=f"{split}-{index:07d}", background=rng.choice(list(BACKGROUNDS)), objects=objects)
    scene.raw_caption = _raw_caption(scene, rng, config.raw_hallucination_rate, colours)
    scene.questions = _questions(scene, rng, colours)
    return scene


def _polygon(cx: float, cy: float, radius: float, shape: str) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles, radii = [90, 210, 330], [radius] * 3
    elif shape == "diamond":
        angles, radii = [0, 90, 180, 270], [radius] * 4
    elif shape == "star":
        angles, radii = [90 + 36 * i for i in range(10)], [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
    else:
        raise ValueError(shape)
    return [
        (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
        for a, r in zip(angles, radii, strict=True)
    ]


def _texture(draw: ImageDraw.ImageDraw, rng: random.Random, image_size: int, strokes: int, colours: list[str]) -> None:
    """Distractor strokes: short lines in object colours, one pixel wide, so they never form a shape."""
    for _ in range(strokes):
        x, y = rng.uniform(0, image_size), rng.uniform(0, image_size)
        dx, dy = rng.uniform(-6, 6), rng.uniform(-6, 6)
        draw.line((x, y, x + dx, y + dy), fill=colour_rgb(rng.choice(colours)), width=1)


def render(scene: Scene, image_size: int, seed: int = 0, world: WorldConfig | None = None) -> Image.Image:
    """Draws a scene. Positions jitter inside each cell by a seeded amount; `world` sets the difficulty knobs.

    With `overlap`, an object's centre stays inside its own cell (its place in the long caption), and a scene
    in which a later object hides more than half of an earlier one is drawn again with half the jitter (then a
    quarter, then none, when no object can hide another): the captions and questions name every object, so
    every one must be seen (at overlap 0.5, 2 of 974 objects were hidden entirely, and 94 sat in another cell
    than their caption's)."""
    return placed_render(scene, image_size, seed, world)[0]


def placed_render(scene: Scene, image_size: int, seed: int = 0, world: WorldConfig | None = None):
    """(image, [(x, y, mask) of each object]) as `render` draws them; the masks are the objects' own pixels
    before any later object covers them (None at overlap 0, where objects stay in their cells)."""
    world = world or WorldConfig()
    rng = random.Random(f"{seed}/render/{scene.key}")  # one stream through the attempts: each draws anew
    for overlap in (world.overlap, world.overlap / 2, world.overlap / 4, 0.0):
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
        draw = ImageDraw.Draw(image)
        if world.texture:
            strokes = round(world.texture * image_size * image_size * 0.01)
            _texture(draw, random.Random(f"{seed}/texture/{scene.key}"), image_size, strokes, palette(world))
        placed = _draw_objects(draw, scene.objects, rng, image_size, world.object_scale, overlap)
        if not overlap or _each_half_seen([mask for _, _, mask in placed]):
            break  # the last attempt, without overlap, always is
    return image, placed


def _draw_objects(draw, objects: list[WorldObject], rng: random.Random, image_size: int, scale: float, overlap: float):
    """Draws the objects; returns each one's (x, y, mask), the mask drawn only with `overlap`."""
    cell = image_size / 3
    placed = []
    for obj in objects:
        radius = cell * (0.42 if obj.size == "large" else 0.24) * scale
        slack = cell / 2 - radius + overlap * cell
        # The centre inside its own cell (the bound is below half a cell anyway without overlap).
        reach = min(0.8 * slack, 0.495 * cell)
        cx = (obj.cell % 3 + 0.5) * cell + rng.uniform(-reach, reach)
        cy = (obj.cell // 3 + 0.5) * cell + rng.uniform(-reach, reach)
        _shape(draw, obj.shape, cx, cy, radius, colour_rgb(obj.colour))
        mask = None
        if overlap:
            mask = Image.new("L", (image_size, image_size), 0)
            _shape(ImageDraw.Draw(mask), obj.shape, cx, cy, radius, 255)
        placed.append((cx, cy, mask))
    return placed


def _shape(draw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        r = radius * 0.85
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "cross":
        w = radius * 0.35
        draw.rectangle((cx - radius, cy - w, cx + radius, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - radius, cx + w, cy + radius), fill=fill)
    else:
        draw.polygon(_polygon(cx, cy, radius, shape), fill=fill)


def _each_half_seen(masks: list[Image.Image]) -> bool:
    """Whether every object keeps at least half of its pixels in view of the objects drawn after it."""
    covered = None
    for mask in reversed(masks):
        pixels = np.asarray(mask) > 0
        if covered is not None and (pixels & ~covered).sum() < 0.5 * pixels.sum():
            return False
        covered = pixels if covered is None else covered | pixels
    return True


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def vocabulary_corpus(world: WorldConfig | None = None) -> list[str]:
    """Every word the world can say, one phrase per line, for training the tokenizer."""
    colours = palette(world or WorldConfig())
    lines = [" ".join(SHAPES), " ".join(colours), " ".join(BACKGROUNDS), " ".join(SIZES), " ".join(NUMBER_WORDS)]
    lines += [f"at the {p}" for p in PLACES] + ["in the center on a background and"]
    lines += ["a picture of shapes", "image", "colorful shapes on a background"]
    lines += ["is there a ?", "how many shapes are there ?", "what color is the ?", "yes no"]
    lines += [f"how many {s}s are there ?" for s in SHAPES]
    return lines


def scene_from_metadata(meta: dict) -> Scene:
    """The Scene that `Scene.metadata()` (or the raw sample's ground truth) describes."""
    objects = [WorldObject(o["shape"], o["colour"], o["size"], PLACES.index(o["place"])) for o in meta["objects"]]
    return Scene(key=meta["key"], background=meta["background"], objects=objects)
