"""Procedural 32x32 scenes of simple shapes, their captions, and the held-out split.

A scene is one or two objects (shape, color, size, grid position) on a plain background. Its caption
comes from a small grammar, e.g. ``"a large red circle at the top left on a black background"`` or
``"a small blue square at the top and a medium white triangle in the center on a gray background"``.
Everything is deterministic in the seed: the same seed gives the same scenes and the same pixels.

Held-out split: the (shape, color) pairs in :data:`HELDOUT_PAIRS` never appear in training scenes
(``split="train"``); the evaluation split (``split="heldout"``) is made of scenes whose first object
is such a pair. Each shape and each color appears in training, only these combinations do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dmquant.errors import DMQuantError

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "magenta": (225, 40, 225),
    "cyan": (40, 225, 235),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (120, 120, 120),
    "brown": (105, 65, 25),
}
SIZES: dict[str, float] = {"small": 4.0, "medium": 6.0, "large": 8.5}  # half-extent in pixels
_GRID = (8.5, 16.0, 23.5)
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) of the object centre
    "top left": (_GRID[0], _GRID[0]),
    "top": (_GRID[1], _GRID[0]),
    "top right": (_GRID[2], _GRID[0]),
    "left": (_GRID[0], _GRID[1]),
    "center": (_GRID[1], _GRID[1]),
    "right": (_GRID[2], _GRID[1]),
    "bottom left": (_GRID[0], _GRID[2]),
    "bottom": (_GRID[1], _GRID[2]),
    "bottom right": (_GRID[2], _GRID[2]),
}
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "yellow"), ("square", "blue"), ("triangle", "white"), ("diamond", "green")}
)
SPLITS = ("train", "heldout", "all")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, options, what in (
            (self.shape, SHAPES, "shape"),
            (self.color, COLORS, "color"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in options:
                raise DMQuantError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")

    def phrase(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise DMQuantError(f"a scene holds one or two objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise DMQuantError(f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}")

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"

    @property
    def heldout(self) -> bool:
        return any((o.shape, o.color) in HELDOUT_PAIRS for o in self.objects)


def _alternation(options) -> str:
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


_OBJECT_RE = (
    rf"a (?P<size{{i}}>{_alternation(SIZES)}) (?P<color{{i}}>{_alternation(COLORS)}) "
    rf"(?P<shape{{i}}>{_alternation(SHAPES)}) (?:in the (?P<center{{i}}>center)|at the (?P<pos{{i}}>{_alternation(POSITIONS)}))"
)
_CAPTION_RE = re.compile(
    "^" + _OBJECT_RE.format(i=0) + "(?: and " + _OBJECT_RE.format(i=1) + ")?"
    + rf" on a (?P<bg>{_alternation(BACKGROUNDS)}) background$"
)


def parse_caption(text: str) -> Scene:
    """Inverse of ``Scene.caption``: the scene a grammar caption describes (DMQuantError if none)."""
    m = _CAPTION_RE.match(" ".join(text.strip().lower().split()))
    if m is None:
        raise DMQuantError(f"not a caption of the shapes grammar: {text!r} (example: {EXAMPLE_CAPTION!r})")
    objects = []
    for i in (0, 1):
        if m.group(f"shape{i}") is None:
            continue
        pos = "center" if m.group(f"center{i}") else m.group(f"pos{i}")
        objects.append(ShapeObject(m.group(f"shape{i}"), m.group(f"color{i}"), m.group(f"size{i}"), pos))
    if objects[0].position == objects[-1].position and len(objects) == 2:
        raise DMQuantError(f"two objects at the same position in {text!r}")
    return Scene(tuple(objects), m.group("bg"))


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted."""
    words = {"a", "at", "the", "in", "on", "and", "background", *SHAPES, *COLORS, *SIZES, *BACKGROUNDS}
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------- sampling
def _pairs(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise DMQuantError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    every = [(s, c) for s in SHAPES for c in COLORS]
    if split == "train":
        return [p for p in every if p not in HELDOUT_PAIRS]
    if split == "heldout":
        return sorted(HELDOUT_PAIRS)
    return every


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_prob: float = 0.3) -> Scene:
    """One random scene of ``split``; object colors always differ from the background color."""
    first_pairs = _pairs(split)
    second_pairs = _pairs("train")
    background = _pick(rng, BACKGROUNDS)
    n = 2 if rng.random() < two_object_prob else 1
    objects: list[ShapeObject] = []
    positions = list(POSITIONS)
    for i in range(n):
        pairs = first_pairs if i == 0 else second_pairs
        shape, color = _pick(rng, pairs)
        pos = _pick(rng, positions)
        positions.remove(pos)
        objects.append(ShapeObject(shape, color, _pick(rng, SIZES), pos))
    return Scene(tuple(objects), background)


# ----------------------------------------------------------------------------------------------- rendering
def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up; base at dy = 0.8 r, half-width r at the base
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * (1.0 / 1.8))
    raise DMQuantError(f"unknown shape {shape!r}")


_FINE = (np.arange(IMAGE_SIZE * _SUPERSAMPLE, dtype=np.float64) + 0.5) / _SUPERSAMPLE


def render(scene: Scene, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 image, anti-aliased by 4x supersampling.

    With an ``rng`` (or an int seed) the object centres move by up to +-1 px and sizes by +-10 %;
    with ``None`` the rendering is the canonical one.
    """
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))
    n = IMAGE_SIZE * _SUPERSAMPLE
    img = np.empty((n, n, 3), dtype=np.float64)
    img[:] = BACKGROUNDS[scene.background]
    yy, xx = _FINE[:, None], _FINE[None, :]
    for obj in scene.objects:
        cx, cy = POSITIONS[obj.position]
        r = SIZES[obj.size]
        if rng is not None:
            cx += rng.uniform(-1.0, 1.0)
            cy += rng.uniform(-1.0, 1.0)
            r *= rng.uniform(0.9, 1.1)
        img[_mask(obj.shape, xx - cx, yy - cy, r)] = COLORS[obj.color]
    small = img.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def make_dataset(
    n: int, seed: int = 0, split: str = "train", two_object_prob: float = 0.3
) -> tuple[np.ndarray, list[str]]:
    """``n`` images (uint8, N x 32 x 32 x 3) and their captions, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = sample_scene(rng, split, two_object_prob)
        images[i] = render(scene, rng)
        captions.append(scene.caption)
    return images, captions


def sample_captions(n: int, seed: int = 0, split: str = "heldout", two_object_prob: float = 0.0) -> list[str]:
    """``n`` captions of ``split`` (distinct where the split allows), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        cap = sample_scene(rng, split, two_object_prob).caption
        if cap not in seen:
            seen.add(cap)
            out.append(cap)
            if len(out) == n:
                break
    return out


def variants(caption: str, attribute: str) -> tuple[list[str], int]:
    """Captions that differ from ``caption`` only in ``attribute`` of its first object.

    ``attribute`` is "shape", "color", "size" or "position" (of the first object) or "background".
    Returns the candidate captions and the index of the true one; used for zero-shot classification.
    """
    scene = parse_caption(caption)
    first = scene.objects[0]
    if attribute == "background":
        options = list(BACKGROUNDS)
        scenes = [Scene(scene.objects, b) for b in options]
        return [s.caption for s in scenes], options.index(scene.background)
    table = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}
    if attribute not in table:
        raise DMQuantError(f"unknown attribute {attribute!r}; choose one of shape, color, size, position, background")
    options = list(table[attribute])
    caps = []
    for value in options:
        obj = ShapeObject(**{**first.__dict__, attribute: value})
        caps.append(Scene((obj, *scene.objects[1:]), scene.background).caption)
    return caps, options.index(getattr(first, attribute))


EXAMPLE_CAPTION = "a large red circle at the top left on a black background"
