"""Compositional scenes for CLIP, with the hard negatives TripletCLIP trains on.

A scene holds two objects (shape, colour, size, position) and the spatial relation of the
first to the second; its caption comes from a template (``"a red circle to the left of a
blue square"``). For every two-object scene the generator also builds six hard negatives,
each a caption *and* the scene that caption describes, rendered like the positive
(TripletCLIP renders an image for every negative caption):

=============  ==========================================================================
swap-att       the two colours exchange places (``a blue circle ... a red square``)
swap-obj       the two shapes exchange places (``a red square ... a blue circle``)
replace-obj    one shape becomes a shape absent from the scene
replace-att    one colour becomes a colour absent from the scene
replace-rel    the relation becomes another one (the image is re-laid out to match)
add-att        a size word is added to an object whose size the caption left out, and it
               is the wrong size (the negative image has the object at that size)
=============  ==========================================================================

Distractors (``SceneConfig.distractors``, 1 by default): objects in the image that the caption
does not mention, each of a colour and a shape that the two named objects do not have. They take
away the shortcut of reading a caption as a bag of words: replace-att and replace-obj then take
their new colour or shape from a distractor, so the replaced word names something in the image
and only its binding to the right object is wrong, and a size word may be true of some object in
the image but not of the one it is bound to. With ``distractors=0`` the scenes are those of the
first benchmark (replace-att and replace-obj take a colour or shape absent from the image).

Every negative except add-att is *symmetric*: the positive caption is false of the negative
image as well. add-att cannot be: a caption that leaves the size out is true of the object
at either size. ``HardNegative.symmetric`` says which; the TripletCLIP loss uses it so that
it never pushes a negative image away from a caption that is true of it.

Generalisation split: a few colour-shape pairs (``HELD_OUT``, one per colour and one per
shape) never appear in the ``train`` and ``test`` splits, neither in positives nor in any
negative; every scene of the ``combo`` split has at least one of them.

Everything is a pure function of ``(seed, split, index)``: scene ``i`` is the same whatever
else was generated, so a data set renders lazily and shards freely across ranks.

Real data: :class:`WebDatasetShards` reads image-text WebDataset tar shards with
:mod:`tarfile` (``<key>.jpg|png`` + ``<key>.txt``, optionally ``<key>.neg.txt`` and
``<key>.neg.jpg|png``); :class:`CsvImageText` reads a CSV/TSV of image paths and captions.
Both yield the same dict items as :class:`SceneDataset`.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
#: Pure RGB values, drawn without anti-aliasing, so that a pixel's colour names its object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
#: Object radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.10, "large": 0.16}
#: Relation of the first object to the second, and its words in a caption.
RELATIONS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
#: Caption templates for two-object scenes; the first object always comes first, so that
#: a negative caption differs from its positive only in the words the edit changes.
#: ``{a}`` and ``{b}`` are noun phrases with their article (``a red circle``, ``an orange star``).
TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b}",
    "a photo of {a} {rel} {b}",
    "there is {a} {rel} {b}",
)
#: Caption of a one-object scene (the zero-shot split) and the zero-shot prompt.
SINGLE_TEMPLATE = "a photo of {a}"
#: Colour-shape pairs absent from the train and test splits: one per colour, one per shape,
#: so that every colour and every shape is still seen in training.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("purple", "cross"),
    ("orange", "diamond"),
)
NEGATIVE_KINDS: tuple[str, ...] = ("swap-att", "swap-obj", "replace-obj", "replace-att", "replace-rel", "add-att")
#: Split name -> stream id in the seed sequence. ``train`` and ``test`` share a distribution
#: (no held-out pair anywhere); ``combo`` has a held-out pair in every scene; ``zeroshot``
#: holds one object per scene, cycling through all colour-shape pairs.
SPLITS: dict[str, int] = {"train": 0, "test": 1, "combo": 2, "zeroshot": 3}

#: Distractors per two-object scene by default, and the most that fit (``SceneConfig.distractors``).
DISTRACTORS, MAX_DISTRACTORS = 1, 2
#: Tries at placing a distractor (or a re-laid-out pair) clear of the other objects before a new layout.
_PLACEMENT_TRIES = 100

# Margins in unit coordinates: objects are laid out for the large size, so that a size edit
# (add-att) never pushes an object off the image or onto the other one.
_EDGE = max(SIZES.values()) + 0.02
_MIN_SEP = 2 * max(SIZES.values()) + 0.04


# --------------------------------------------------------------------------- scenes


def noun_phrase(colour: str | None = None, shape: str | None = None, size: str | None = None) -> str:
    """``a|an [size] [colour] [shape]``: the article agrees with the first word."""
    words = " ".join(w for w in (size, colour, shape) if w)
    return f"{'an' if words[:1] in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class SceneObject:
    """One object; ``x``, ``y`` are its centre in unit coordinates (``y`` grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    #: Whether the caption names the size (captions name it for at most one object).
    size_mentioned: bool = False

    def phrase(self) -> str:
        """The object's words in a caption: ``a|an [size] colour shape``."""
        return noun_phrase(self.colour, self.shape, self.size if self.size_mentioned else None)


@dataclass(frozen=True)
class Scene:
    """One object, or two named ones and then any distractors (never in the caption);
    ``relation`` is that of ``objects[0]`` to ``objects[1]``."""

    objects: tuple[SceneObject, ...]
    relation: str | None = None
    template: int = 0

    @property
    def caption(self) -> str:
        """The scene's caption (a pure function of the scene)."""
        if len(self.objects) == 1:
            return SINGLE_TEMPLATE.format(a=self.objects[0].phrase())
        a, b = self.objects[:2]
        return TEMPLATES[self.template].format(a=a.phrase(), rel=RELATIONS[self.relation], b=b.phrase())

    @property
    def distractors(self) -> tuple[SceneObject, ...]:
        """The objects the caption does not mention."""
        return self.objects[2:]


@dataclass(frozen=True)
class HardNegative:
    """A hard negative: its caption, the scene it describes, and whether it is symmetric."""

    kind: str
    scene: Scene
    #: True when the positive caption is false of this negative's scene too.
    symmetric: bool = True

    @property
    def caption(self) -> str:
        return self.scene.caption


@dataclass(frozen=True)
class SceneSample:
    """A positive scene and its hard negatives by kind."""

    scene: Scene
    negatives: dict[str, HardNegative] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return self.scene.caption


@dataclass(frozen=True)
class SceneConfig:
    """What the generator draws from."""

    image_size: int = 64
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    held_out: tuple[tuple[str, str], ...] = HELD_OUT
    #: Unmentioned objects in every two-object scene (module docstring); 0 gives the first benchmark.
    distractors: int = DISTRACTORS

    def __post_init__(self) -> None:
        if not 0 <= self.distractors <= MAX_DISTRACTORS:
            raise ValueError(f"distractors={self.distractors}; expected 0..{MAX_DISTRACTORS} (more do not fit the "
                             "image beside two named objects)")

    def allowed(self, colour: str, shape: str) -> bool:
        """Whether the pair may appear in the train and test splits."""
        return (colour, shape) not in self.held_out


# --------------------------------------------------------------------------- geometry


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether ``a`` is ``relation`` of ``b``: the relation's axis must dominate the offset.

    Requiring the axis to dominate makes exactly one relation (or its mirror) true of a
    pair, so that a replaced relation is false of the scene, not merely less apt.
    """
    dx, dy = b.x - a.x, b.y - a.y
    if relation == "left":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "right":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy > 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy < 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def _place(rng: np.random.Generator, relation: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of two objects such that the first is ``relation`` of the second.

    The separation along the relation's axis is at least ``_MIN_SEP`` (two large objects
    never touch) and the offset across it at most half that, drawn constructively rather
    than by rejection so that the layout covers the image evenly.
    """
    lo, hi = _EDGE, 1.0 - _EDGE
    d = rng.uniform(_MIN_SEP, hi - lo)
    main0 = rng.uniform(lo, hi - d)
    main1 = main0 + d
    cross0 = rng.uniform(lo, hi)
    e_lo, e_hi = max(-d / 2, lo - cross0), min(d / 2, hi - cross0)
    cross1 = cross0 + rng.uniform(e_lo, e_hi)
    if relation in ("right", "below"):
        main0, main1 = main1, main0
    if relation in ("left", "right"):
        return (main0, cross0), (main1, cross1)
    return (cross0, main0), (cross1, main1)


def _clear(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    """Whether an object at ``point`` keeps ``_MIN_SEP`` from every centre in ``others`` (never touches one)."""
    return all(np.hypot(point[0] - x, point[1] - y) >= _MIN_SEP for x, y in others)


def _place_clear(rng: np.random.Generator, others: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """A centre clear of ``others``, uniform over the image's free area, or None if none is found."""
    lo, hi = _EDGE, 1.0 - _EDGE
    for _ in range(_PLACEMENT_TRIES):
        point = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        if _clear(point, others):
            return point
    return None


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius ``r`` centred on ``(cx, cy)`` (pixels)."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        ang = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in ang]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            t = np.deg2rad(-90 + 36 * i)
            pts.append((cx + rad * np.cos(t), cy + rad * np.sin(t)))
        return pts
    if shape == "cross":
        w = 0.35 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene on a white RGB canvas, without anti-aliasing (pure object colours)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = obj.x * image_size, obj.y * image_size, SIZES[obj.size] * image_size
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return img


def image_to_tensor(img: Image.Image, image_size: int | None = None) -> torch.Tensor:
    """An RGB image as a float tensor ``(3, S, S)`` scaled to ``[-1, 1]``.

    A non-square or differently sized image (real data) is resized on its short side and
    centre-cropped, as CLIP's own preprocessing does.
    """
    img = img.convert("RGB")
    if image_size is not None and img.size != (image_size, image_size):
        w, h = img.size
        s = image_size / min(w, h)
        img = img.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class ObjectDescription:
    """What a caption says of one object (``None``: not said)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return ((self.shape is None or self.shape == obj.shape)
                and (self.colour is None or self.colour == obj.colour)
                and (self.size is None or self.size == obj.size))


@dataclass(frozen=True)
class CaptionDescription:
    """A parsed caption: one or two object descriptions and the relation between them."""

    objects: tuple[ObjectDescription, ...]
    relation: str | None = None


_PREFIXES = (("a", "photo", "of"), ("there", "is"))
_RELATION_WORDS = {rel: tuple(words.split()) for rel, words in RELATIONS.items()}


def _parse_np(words: list[str], i: int) -> tuple[ObjectDescription | None, int]:
    """Parse ``a|an [size] [colour] [shape]`` at ``words[i]``; return the description and next index."""
    if i >= len(words) or words[i] not in ("a", "an"):
        return None, i
    i += 1
    size = colour = shape = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in COLOURS:
        colour, i = words[i], i + 1
    if i < len(words) and words[i] in SHAPES:
        shape, i = words[i], i + 1
    if size is None and colour is None and shape is None:
        return None, i
    return ObjectDescription(shape=shape, colour=colour, size=size), i


@functools.lru_cache(maxsize=65536)
def parse_caption(text: str) -> CaptionDescription | None:
    """Parse a caption of this generator's language; ``None`` if it is not one (cached: immutable result)."""
    words = re.findall(r"[a-z]+", text.lower())
    for prefix in _PREFIXES:
        if tuple(words[: len(prefix)]) == prefix and words[len(prefix): len(prefix) + 1] in (["a"], ["an"]):
            words = words[len(prefix):]
            break
    first, i = _parse_np(words, 0)
    if first is None:
        return None
    if i == len(words):
        return CaptionDescription(objects=(first,))
    for rel, rel_words in _RELATION_WORDS.items():
        if tuple(words[i: i + len(rel_words)]) == rel_words:
            second, j = _parse_np(words, i + len(rel_words))
            if second is not None and j == len(words):
                return CaptionDescription(objects=(first, second), relation=rel)
    return None


def caption_true_of(scene: Scene, text: str) -> bool:
    """Whether the caption is true of the scene (by meaning, not by string).

    A two-object caption is true when some ordered pair of distinct objects matches its two
    descriptions and stands in its relation, so ``"a blue square to the right of a red
    circle"`` is true of the scene captioned ``"a red circle to the left of a blue square"``.
    """
    desc = parse_caption(text)
    if desc is None:
        return False
    objs = scene.objects
    if len(desc.objects) == 1:
        return any(desc.objects[0].matches(o) for o in objs)
    d0, d1 = desc.objects
    return any(i != j and d0.matches(objs[i]) and d1.matches(objs[j]) and relation_holds(objs[i], objs[j], desc.relation)
               for i in range(len(objs)) for j in range(len(objs)))


def scene_vocabulary() -> list[str]:
    """Every word this generator's captions and prompts use (for the word tokenizer)."""
    words: set[str] = set()
    for text in (*TEMPLATES, SINGLE_TEMPLATE, *RELATIONS.values()):
        words.update(w for w in re.findall(r"[a-z]+", text) if w not in ("a", "b", "rel"))
    words.update(("a", "an", *SHAPES, *COLOURS, *SIZES))
    return sorted(words)


# --------------------------------------------------------------------------- generator


class SceneGenerator:
    """Deterministic scenes and hard negatives: ``sample(split, index)`` depends on nothing else."""

    def __init__(self, config: SceneConfig | None = None, seed: int = 0) -> None:
        self.config = config or SceneConfig()
        self.seed = seed
        unknown = [p for p in self.config.held_out if p[0] not in COLOURS or p[1] not in SHAPES]
        if unknown:
            raise ValueError(f"held-out pairs outside the vocabulary: {unknown}")

    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        """The random stream of one scene (``stream`` separates independent uses)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[split], index, stream]))

    # -- positives

    def _objects_train(self, rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
        """Two (colour, shape) pairs, distinct in both, such that they and their swaps are allowed."""
        cfg = self.config
        while True:
            ca, cb = rng.choice(cfg.colours, size=2, replace=False)
            sa, sb = rng.choice(cfg.shapes, size=2, replace=False)
            # The swaps (colour of one on the shape of the other) are the swap negatives:
            # held-out pairs must not slip into training through them either.
            if all(cfg.allowed(c, s) for c, s in ((ca, sa), (cb, sb), (cb, sa), (ca, sb))):
                return (str(ca), str(sa)), (str(cb), str(sb))

    def _objects_combo(self, rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
        """Two pairs distinct in colour and shape, at least one of them held out."""
        cfg = self.config
        held = cfg.held_out[rng.integers(len(cfg.held_out))]
        others = [(c, s) for c in cfg.colours for s in cfg.shapes if c != held[0] and s != held[1]]
        other = others[rng.integers(len(others))]
        return (held, other) if rng.random() < 0.5 else (other, held)

    def _distractor_pairs(self, rng: np.random.Generator, pair_a: tuple[str, str], pair_b: tuple[str, str],
                          constrained: bool) -> list[tuple[str, str]] | None:
        """``config.distractors`` (colour, shape) pairs, in colours and shapes no other object has;
        ``constrained`` (train, test): each pair, and each pair a replace-att or replace-obj negative
        makes of it with a named object, is allowed. None when no such pairs exist."""
        cfg = self.config
        chosen: list[tuple[str, str]] = []
        for _ in range(cfg.distractors):
            used = [pair_a, pair_b, *chosen]
            used_colours, used_shapes = {c for c, _ in used}, {s for _, s in used}
            options = [(c, s) for c in cfg.colours for s in cfg.shapes if c not in used_colours and s not in used_shapes]
            if constrained:
                named = (pair_a, pair_b)
                options = [(c, s) for c, s in options
                           if cfg.allowed(c, s) and all(cfg.allowed(c, n[1]) and cfg.allowed(n[0], s) for n in named)]
            if not options:
                return None
            chosen.append(options[rng.integers(len(options))])
        return chosen

    def _positive(self, split: str, rng: np.random.Generator) -> Scene:
        while True:
            pair_a, pair_b = self._objects_combo(rng) if split == "combo" else self._objects_train(rng)
            distractor_pairs = self._distractor_pairs(rng, pair_a, pair_b, constrained=split != "combo")
            if distractor_pairs is not None:
                break
        relation = str(rng.choice(list(RELATIONS)))
        while True:
            p0, p1 = _place(rng, relation)
            placed: list[tuple[float, float]] = [p0, p1]
            for _ in distractor_pairs:
                point = _place_clear(rng, placed)
                if point is None:
                    break
                placed.append(point)
            if len(placed) == 2 + len(distractor_pairs):
                break
        sizes = rng.choice(list(SIZES), size=2 + len(distractor_pairs))
        # Name the size of no object, the first or the second, so that a caption's length
        # tells nothing about whether it is an add-att negative.
        mention = int(rng.integers(3))
        objs = tuple(
            SceneObject(shape=pair[1], colour=pair[0], size=str(sz), x=float(p[0]), y=float(p[1]),
                        size_mentioned=(mention == k + 1))
            for k, (pair, sz, p) in enumerate(zip((pair_a, pair_b, *distractor_pairs), sizes, placed, strict=True))
        )
        return Scene(objects=objs, relation=relation, template=int(rng.integers(len(TEMPLATES))))

    def _single(self, index: int, rng: np.random.Generator) -> Scene:
        """A one-object scene; pairs cycle through every colour-shape pair, held-out ones included."""
        cfg = self.config
        colour = cfg.colours[index % len(cfg.colours)]
        shape = cfg.shapes[(index // len(cfg.colours)) % len(cfg.shapes)]
        lo, hi = _EDGE, 1.0 - _EDGE
        obj = SceneObject(shape=shape, colour=colour, size=str(rng.choice(list(SIZES))),
                          x=float(rng.uniform(lo, hi)), y=float(rng.uniform(lo, hi)))
        return Scene(objects=(obj,))

    # -- negatives

    def _negatives(self, scene: Scene, rng: np.random.Generator, constrained: bool) -> dict[str, HardNegative]:
        """The six hard negatives of a two-object scene (each with the scene it describes).

        The distractors stay as they are in every negative image; with distractors, replace-obj
        and replace-att take a distractor's shape or colour (the word then names something in the
        image), else a shape or colour absent from it.
        """
        cfg = self.config

        def allowed(colour: str, shape: str) -> bool:
            return cfg.allowed(colour, shape) if constrained else True

        a, b = scene.objects[:2]
        distractors = scene.distractors
        out: dict[str, HardNegative] = {}

        def with_objects(na: SceneObject, nb: SceneObject, **kw: Any) -> Scene:
            return replace(scene, objects=(na, nb, *distractors), **kw)

        def replacements(present: list[str], every: Sequence[str], named: tuple[str, str]) -> list[str]:
            return present if distractors else [x for x in every if x not in named]

        if a.colour != b.colour and allowed(b.colour, a.shape) and allowed(a.colour, b.shape):
            out["swap-att"] = HardNegative("swap-att", with_objects(replace(a, colour=b.colour),
                                                                    replace(b, colour=a.colour)))
            out["swap-obj"] = HardNegative("swap-obj", with_objects(replace(a, shape=b.shape),
                                                                    replace(b, shape=a.shape)))
        for target in rng.permutation(2):
            obj = scene.objects[target]
            options = [s for s in replacements([d.shape for d in distractors], cfg.shapes, (a.shape, b.shape))
                       if allowed(obj.colour, s)]
            if options:
                objs = [a, b]
                objs[target] = replace(obj, shape=options[rng.integers(len(options))])
                out["replace-obj"] = HardNegative("replace-obj", with_objects(*objs))
                break
        for target in rng.permutation(2):
            obj = scene.objects[target]
            options = [c for c in replacements([d.colour for d in distractors], cfg.colours, (a.colour, b.colour))
                       if allowed(c, obj.shape)]
            if options:
                objs = [a, b]
                objs[target] = replace(obj, colour=options[rng.integers(len(options))])
                out["replace-att"] = HardNegative("replace-att", with_objects(*objs))
                break
        new_rel = str(rng.choice([r for r in RELATIONS if r != scene.relation]))
        layout = None
        if new_rel != OPPOSITE[scene.relation]:
            others = [(d.x, d.y) for d in distractors]
            for _ in range(_PLACEMENT_TRIES):
                pa, pb = _place(rng, new_rel)
                if _clear(pa, others) and _clear(pb, others):
                    layout = (pa, pb)
                    break
            else:  # no layout of this relation clears the distractors: the mirror relation instead
                new_rel = OPPOSITE[scene.relation]
        if layout is None:
            # Exchanging the positions gives the mirror relation with the same pixels moved:
            # the hardest image negative, nothing but the layout tells them apart.
            pa, pb = (b.x, b.y), (a.x, a.y)
        else:
            pa, pb = layout
        out["replace-rel"] = HardNegative("replace-rel", with_objects(
            replace(a, x=float(pa[0]), y=float(pa[1])), replace(b, x=float(pb[0]), y=float(pb[1])), relation=new_rel))
        unmentioned = [k for k, o in enumerate((a, b)) if not o.size_mentioned]
        if unmentioned:
            target = unmentioned[rng.integers(len(unmentioned))]
            obj = scene.objects[target]
            other = next(s for s in SIZES if s != obj.size)
            objs = [a, b]
            objs[target] = replace(obj, size=other, size_mentioned=True)
            # The positive caption leaves this size out, so it is true of the negative image.
            out["add-att"] = HardNegative("add-att", with_objects(*objs), symmetric=False)
        return {k: out[k] for k in NEGATIVE_KINDS if k in out}

    def sample(self, split: str, index: int) -> SceneSample:
        """Scene ``index`` of ``split`` with its hard negatives (none for the zeroshot split)."""
        rng = self.rng(split, index)
        if split == "zeroshot":
            return SceneSample(self._single(index, rng))
        scene = self._positive(split, rng)
        return SceneSample(scene, self._negatives(scene, rng, constrained=split != "combo"))

    def render(self, scene: Scene) -> Image.Image:
        """The scene at the configured image size."""
        return render_scene(scene, self.config.image_size)


# --------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the CLIP task needs of a tokenizer (open_clip's SimpleTokenizer fits)."""

    context_length: int

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor: ...


class WordTokenizer:
    """A word-level tokenizer over a closed vocabulary, in open_clip's token layout.

    Why not open_clip's BPE tokenizer: it works offline, but its 49,408-entry vocabulary
    gives a tiny text tower an embedding table of millions of parameters, all synchronised
    every step, for a language of ~40 words. Here the vocabulary is the generator's; ids
    follow open_clip's layout (pad 0, start-of-text first, end-of-text the *largest* id)
    because open_clip's text tower pools at ``argmax(token id)``.
    """

    PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"

    def __init__(self, words: Sequence[str] | None = None, context_length: int = 24) -> None:
        words = list(words) if words is not None else scene_vocabulary()
        self.vocab: list[str] = [self.PAD, self.UNK, self.SOT, *sorted(set(words)), self.EOT]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def words(self) -> list[str]:
        """The vocabulary without the special tokens (what to store to rebuild the tokenizer)."""
        return self.vocab[3:-1]

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (lower-cased, punctuation dropped), without start/end tokens."""
        unk = self.index[self.UNK]
        return [self.index.get(w, unk) for w in re.findall(r"[a-z0-9]+", text.lower())]

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids``, skipping special tokens."""
        return " ".join(self.vocab[int(i)] for i in ids if 2 < int(i) < len(self.vocab) - 1)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids ``(N, context_length)``: start, words, end, zero padding (truncated before the end token)."""
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index[self.SOT], *self.encode(text)][: n - 1] + [self.index[self.EOT]]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


# --------------------------------------------------------------------------- data sets


class SceneDataset(Dataset):
    """Scenes of one split as training items.

    Item: ``image`` ``(3, S, S)`` in ``[-1, 1]``, ``text`` token ids; with negatives also
    ``neg_text``, ``neg_image`` (unless ``negative_images=False``), ``neg_kind`` (index in
    ``NEGATIVE_KINDS``) and ``neg_symmetric``. The negative of item ``i`` is one of its
    kinds, drawn from the scene's own random stream (so it is the same every epoch).
    """

    def __init__(self, generator: SceneGenerator, split: str, size: int, tokenizer: Tokenizer,
                 negatives: bool = True, negative_images: bool = True,
                 negative_kinds: Sequence[str] = NEGATIVE_KINDS) -> None:
        bad = [k for k in negative_kinds if k not in NEGATIVE_KINDS]
        if bad:
            raise ValueError(f"unknown negative kinds {bad}; known: {NEGATIVE_KINDS}")
        if not negative_kinds:
            raise ValueError("negative_kinds is empty")
        if split == "zeroshot" and negatives:
            raise ValueError("the zeroshot split has no negatives")
        self.generator, self.split, self.size, self.tokenizer = generator, split, size, tokenizer
        self.negatives, self.negative_images = negatives, negative_images
        self.negative_kinds = tuple(negative_kinds)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        gen = self.generator
        sample = gen.sample(self.split, index)
        item = {"image": image_to_tensor(gen.render(sample.scene)), "text": self.tokenizer([sample.caption])[0]}
        if self.negatives:
            kinds = [k for k in self.negative_kinds if k in sample.negatives]
            if not kinds:
                raise RuntimeError(f"scene {self.split}/{index} has none of the kinds {self.negative_kinds}")
            neg = sample.negatives[kinds[gen.rng(self.split, index, stream=1).integers(len(kinds))]]
            item["neg_text"] = self.tokenizer([neg.caption])[0]
            item["neg_kind"] = torch.tensor(NEGATIVE_KINDS.index(neg.kind))
            item["neg_symmetric"] = torch.tensor(neg.symmetric)
            if self.negative_images:
                item["neg_image"] = image_to_tensor(gen.render(neg.scene))
        return item


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_shards(spec: str | Sequence[str]) -> list[Path]:
    """Shard paths from a spec: a list, ``::``-separated paths, globs, directories and
    WebDataset brace ranges (``shard-{000..009}.tar``)."""
    if not isinstance(spec, str):
        parts = list(spec)
    else:
        parts = [p for p in spec.split("::") if p]
    out: list[Path] = []
    for part in parts:
        part = str(part)
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            width = len(m.group(1))
            expanded = [part[: m.start()] + str(i).zfill(width) + part[m.end():]
                        for i in range(int(m.group(1)), int(m.group(2)) + 1)]
            out.extend(expand_shards(expanded))
        elif os.path.isdir(part):
            out.extend(sorted(Path(part).glob("*.tar*")))
        elif any(ch in part for ch in "*?["):
            out.extend(Path(p) for p in sorted(glob.glob(part)))
        else:
            out.append(Path(part))
    missing = [p for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing[:5]}")
    return out


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00"


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the path up to the first dot of the basename, the field the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


class _ImageTextItems:
    """Shared item building for the real-data sets (image, caption, optional negative)."""

    tokenizer: Tokenizer
    image_size: int

    def _item(self, image: Image.Image, text: str, neg_image: Image.Image | None, neg_text: str | None,
              with_negatives: bool) -> dict[str, torch.Tensor]:
        item = {"image": image_to_tensor(image, self.image_size), "text": self.tokenizer([text.strip()])[0]}
        if with_negatives:
            item["neg_text"] = self.tokenizer([(neg_text or "").strip()])[0]
            item["neg_kind"] = torch.tensor(-1)
            item["neg_symmetric"] = torch.tensor(True)
            if neg_image is not None:
                item["neg_image"] = image_to_tensor(neg_image, self.image_size)
        return item


class WebDatasetShards(_ImageTextItems, Dataset):
    """Image-text pairs from WebDataset tar shards, read with :mod:`tarfile` (map-style).

    A sample is the members sharing a key: an image (``jpg``, ``png``, ...) and ``txt``;
    ``neg.txt`` and ``neg.<image ext>`` give a hard negative caption and image (TripletCLIP's
    data layout). Negatives are used only when every sample has them. Uncompressed shards
    are indexed once and read by offset; compressed ones are loaded into memory.
    """

    def __init__(self, shards: str | Sequence[str], tokenizer: Tokenizer, image_size: int = 64) -> None:
        self.tokenizer, self.image_size = tokenizer, image_size
        self.shards = expand_shards(shards)
        self._samples: list[tuple[int, dict[str, tuple[int, int] | bytes]]] = []
        for si, path in enumerate(self.shards):
            compressed = _is_compressed(path)
            groups: dict[str, dict[str, tuple[int, int] | bytes]] = {}
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    if compressed:
                        groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
                    else:
                        groups.setdefault(key, {})[ext] = (member.offset_data, member.size)
            skipped = 0
            for fields in groups.values():
                if "txt" in fields and any(e in fields for e in IMAGE_EXTS):
                    self._samples.append((si, fields))
                else:
                    skipped += 1
            if skipped:
                log.warning("%s: %d keys without an image and a txt skipped", path, skipped)
        if not self._samples:
            raise ValueError(f"no image-text pairs in {shards!r}")
        self.has_negatives = all("neg.txt" in f for _, f in self._samples)
        self._files: dict[tuple[int, int], Any] = {}
        log.info("%d image-text pairs in %d shards (negatives: %s)", len(self._samples), len(self.shards),
                 self.has_negatives)

    def __len__(self) -> int:
        return len(self._samples)

    def _read(self, shard: int, where: tuple[int, int] | bytes) -> bytes:
        if isinstance(where, bytes):
            return where
        # One open file per process and shard: DataLoader workers are forked, and a file
        # position shared across processes would interleave their reads.
        handle_key = (os.getpid(), shard)
        f = self._files.get(handle_key)
        if f is None:
            f = self._files[handle_key] = open(self.shards[shard], "rb")
        offset, size = where
        f.seek(offset)
        return f.read(size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, fields = self._samples[index]

        def image(prefix: str) -> Image.Image | None:
            for ext in IMAGE_EXTS:
                if prefix + ext in fields:
                    return Image.open(io.BytesIO(self._read(shard, fields[prefix + ext])))
            return None

        text = self._read(shard, fields["txt"]).decode("utf-8")
        neg_text = self._read(shard, fields["neg.txt"]).decode("utf-8") if "neg.txt" in fields else None
        return self._item(image(""), text, image("neg.") if self.has_negatives else None, neg_text,
                          self.has_negatives)


class CsvImageText(_ImageTextItems, Dataset):
    """Image-text pairs from a CSV or TSV file of image paths and captions.

    Columns default to open_clip's (``filepath``, ``title``) and are otherwise guessed from
    the header (``image``/``path``/..., ``caption``/``text``/...); the separator is a tab if
    the header has one, else a comma. Relative paths are taken from ``root`` (default: the
    CSV's folder). Optional ``neg_caption_key``/``neg_img_key`` columns give hard negatives.
    """

    _IMG_KEYS = ("filepath", "image", "image_path", "img", "path", "file", "filename")
    _CAPTION_KEYS = ("title", "caption", "text", "captions")

    def __init__(self, path: str | Path, tokenizer: Tokenizer, image_size: int = 64, img_key: str | None = None,
                 caption_key: str | None = None, separator: str | None = None, root: str | Path | None = None,
                 neg_caption_key: str | None = None, neg_img_key: str | None = None) -> None:
        self.tokenizer, self.image_size = tokenizer, image_size
        path = Path(path)
        self.root = Path(root) if root is not None else path.parent
        with open(path, newline="", encoding="utf-8") as f:
            header = f.readline()
            sep = separator or ("\t" if "\t" in header else ",")
            f.seek(0)
            rows = list(csv.DictReader(f, delimiter=sep))
        if not rows:
            raise ValueError(f"{path}: no rows")
        cols = list(rows[0].keys())
        self.img_key = img_key or self._guess(cols, self._IMG_KEYS, "image")
        self.caption_key = caption_key or self._guess(cols, self._CAPTION_KEYS, "caption")
        for key in (self.img_key, self.caption_key, neg_caption_key, neg_img_key):
            if key is not None and key not in cols:
                raise ValueError(f"{path}: no column {key!r} (columns: {cols})")
        self.neg_caption_key, self.neg_img_key = neg_caption_key, neg_img_key
        self.has_negatives = neg_caption_key is not None
        self.rows = rows

    @staticmethod
    def _guess(cols: list[str], candidates: Sequence[str], what: str) -> str:
        lower = {c.lower(): c for c in cols}
        for cand in candidates:
            if cand in lower:
                return lower[cand]
        raise ValueError(f"no {what} column among {cols}; name it explicitly")

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self, rel: str) -> Image.Image:
        p = Path(rel)
        return Image.open(p if p.is_absolute() else self.root / p)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        neg_image = self._open(row[self.neg_img_key]) if self.neg_img_key else None
        neg_text = row[self.neg_caption_key] if self.neg_caption_key else None
        return self._item(self._open(row[self.img_key]), row[self.caption_key], neg_image, neg_text,
                          self.has_negatives)


def collate_scenes(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch (what torch's default collate does for these dicts)."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}

