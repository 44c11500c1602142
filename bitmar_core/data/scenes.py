"""Procedural captioned scenes: the offline default image–caption data (no caption corpus ships).

A scene is 1–4 coloured shapes on a 3×3 layout over a varied background, a caption from a small
grammar with varied wording, and the ground-truth structure. `attribute_facts(scene)` and
`parse_caption(text)` give comparable fact sets, so a generated caption can be scored by
attribute precision/recall/F1 (`score_caption`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterator

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "oval", "cross", "diamond", "hexagon")
SIZES = ("small", "large")
# 3×3 layout cells (column, row) → position name; row 0 is the top of the image.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}
RELATIONS = ("left of", "right of", "above", "below", "next to")

COLOUR_JITTER = 15  # per channel; keeps every object nearest its named colour (min gap ~80)
RADIUS = {"small": (0.055, 0.08), "large": (0.12, 0.15)}  # fraction of the image side
REPEAT_PROB = 0.3  # chance that a new object copies an earlier one's colour, shape and size

SPLIT_SEED_OFFSET = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000


@dataclass
class SceneObject:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (column, row) of the 3×3 layout
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height
    radius: float  # fraction of the image side
    angle: float  # degrees
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[tuple(self.cell)]

    @property
    def descriptor(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]
    relations: list[tuple[int, str, int]]  # (subject index, relation, object index), as captioned
    background: dict
    caption: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["relations"] = [list(r) for r in self.relations]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objects = [SceneObject(**{**o, "cell": tuple(o["cell"]), "rgb": tuple(o["rgb"])})
                   for o in d["objects"]]
        return cls(seed=d["seed"], objects=objects,
                   relations=[tuple(r) for r in d["relations"]],
                   background=d["background"], caption=d.get("caption", ""))


# --------------------------------------------------------------------------- generation

def split_seed(split: str, index: int) -> int:
    """The scene seed of item `index` of a split; splits use disjoint seed ranges."""
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"split {split!r} unknown; expected one of {list(SPLIT_SEED_OFFSET)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"scene index {index} outside [0, {SPLIT_SIZE})")
    return SPLIT_SEED_OFFSET[split] + index


def generate_scene(seed: int, max_objects: int = 4) -> Scene:
    """The scene structure and caption for `seed` (no pixels; see `render_scene`)."""
    if not 1 <= max_objects <= 9:
        raise ValueError(f"max_objects must be in 1..9, got {max_objects}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_objects + 1))
    descriptors: list[tuple[str, str, str]] = []
    for i in range(n):
        if i > 0 and rng.random() < REPEAT_PROB:
            descriptors.append(descriptors[int(rng.integers(i))])
            continue
        used = {(c, s) for c, s, _ in descriptors}
        while True:
            c = str(rng.choice(list(COLOURS)))
            s = str(rng.choice(SHAPES))
            if (c, s) not in used:
                break
        descriptors.append((c, s, str(rng.choice(SIZES))))

    objects = _place(rng, descriptors)
    relations = _choose_relations(rng, objects)
    scene = Scene(seed=seed, objects=objects, relations=relations, background=_background(rng))
    scene.caption = caption_scene(scene, rng)
    return scene


def _place(rng: np.random.Generator, descriptors) -> list[SceneObject]:
    # Each object gets its own layout cell, with its centre in the cell's inner 60% so its
    # position word is unambiguous; objects never overlap and never leave the image.
    for _ in range(1000):
        cells = [divmod(int(k), 3)[::-1] for k in rng.choice(9, len(descriptors), replace=False)]
        objects: list[SceneObject] = []
        for (c, s, size), cell in zip(descriptors, cells):
            r = float(rng.uniform(*RADIUS[size]))
            for _ in range(50):
                x = (cell[0] + rng.uniform(0.2, 0.8)) / 3
                y = (cell[1] + rng.uniform(0.2, 0.8)) / 3
                inside = r + 0.01 <= x <= 1 - r - 0.01 and r + 0.01 <= y <= 1 - r - 0.01
                apart = all(math.hypot(x - o.x, y - o.y) > r + o.radius + 0.02 for o in objects)
                if inside and apart:
                    break
            else:
                break
            rgb = np.clip(np.array(COLOURS[c]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
            objects.append(SceneObject(colour=c, shape=s, size=size, cell=(int(cell[0]), int(cell[1])),
                                       x=float(x), y=float(y), radius=r, angle=_angle(rng, s),
                                       rgb=tuple(int(v) for v in rgb)))
        if len(objects) == len(descriptors):
            return objects
    raise RuntimeError("could not place the scene's objects without overlap")


def _angle(rng: np.random.Generator, shape: str) -> float:
    # Squares and crosses rotate little so that a square never looks like a diamond.
    if shape in ("square", "cross"):
        return float(rng.uniform(-15, 15))
    if shape == "diamond":
        return float(rng.uniform(-10, 10))
    return float(rng.uniform(0, 360))


def true_relations(a: SceneObject, b: SceneObject) -> set[str]:
    """Every relation word that holds for `a` relative to `b`, from their layout cells."""
    dc, dr = b.cell[0] - a.cell[0], b.cell[1] - a.cell[1]
    rels = set()
    if dc > 0:
        rels.add("left of")
    if dc < 0:
        rels.add("right of")
    if dr > 0:
        rels.add("above")
    if dr < 0:
        rels.add("below")
    if max(abs(dc), abs(dr)) == 1:
        rels.add("next to")
    return rels


def _choose_relations(rng: np.random.Generator, objects: list[SceneObject]) -> list[tuple[int, str, int]]:
    # Relations are captioned only between objects whose colour+shape is unique in the scene
    # (otherwise "the green triangle" would be ambiguous): a chain through them in random order.
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[o.descriptor] = counts.get(o.descriptor, 0) + 1
    unique = [i for i, o in enumerate(objects) if counts[o.descriptor] == 1]
    order = [unique[int(k)] for k in rng.permutation(len(unique))]
    relations = []
    for i, j in zip(order, order[1:]):
        a, b = objects[i], objects[j]
        dc, dr = b.cell[0] - a.cell[0], b.cell[1] - a.cell[1]
        horizontal = "left of" if dc > 0 else "right of"
        vertical = "above" if dr > 0 else "below"
        if dr == 0:
            candidates = [horizontal]
        elif dc == 0:
            candidates = [vertical]
        elif abs(dc) > abs(dr):
            candidates = [horizontal]
        elif abs(dr) > abs(dc):
            candidates = [vertical]
        else:
            candidates = [horizontal, vertical]
        if max(abs(dc), abs(dr)) == 1:
            candidates.append("next to")
        relations.append((i, str(rng.choice(candidates)), j))
    return relations


def _muted_colour(rng: np.random.Generator) -> list[int]:
    # Low saturation, mid value: every named object colour (white and black included) stands out.
    h, s, v = rng.uniform(0, 180), rng.uniform(0, 0.3) * 255, rng.uniform(0.35, 0.8) * 255
    hsv = np.array([[[h, s, v]]], dtype=np.uint8)
    return [int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]]


def _background(rng: np.random.Generator) -> dict:
    kind = str(rng.choice(["plain", "gradient", "noise", "stripes"]))
    return {"kind": kind, "colours": [_muted_colour(rng), _muted_colour(rng)],
            "angle": float(rng.uniform(0, 180)), "period": float(rng.uniform(0.04, 0.15)),
            "noise_seed": int(rng.integers(2**31))}


# --------------------------------------------------------------------------- rendering

def render_scene(scene: Scene, size: int = 224, pixel_noise: float = 2.0) -> np.ndarray:
    """Draw the scene as a uint8 RGB image (size, size, 3), anti-aliased; deterministic."""
    img = _render_background(scene.background, size)
    for o in scene.objects:
        _draw_shape(img, o, size)
    if pixel_noise > 0:
        noise_rng = np.random.default_rng(scene.background["noise_seed"] + 1)
        img = np.clip(img + noise_rng.normal(0, pixel_noise, img.shape), 0, 255)
    return np.round(img).astype(np.uint8)


def _render_background(bg: dict, size: int) -> np.ndarray:
    c0, c1 = np.array(bg["colours"][0], float), np.array(bg["colours"][1], float)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    theta = math.radians(bg["angle"])
    along = xx * math.cos(theta) + yy * math.sin(theta)
    if bg["kind"] == "plain":
        t = np.zeros_like(along)
    elif bg["kind"] == "gradient":
        t = (along - along.min()) / max(np.ptp(along), 1e-9)
    elif bg["kind"] == "stripes":
        t = (np.floor(along / bg["period"]) % 2).astype(float)
    elif bg["kind"] == "noise":
        rng = np.random.default_rng(bg["noise_seed"])
        coarse = rng.random((8, 8)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1).astype(float)
    else:
        raise ValueError(f"background kind {bg['kind']!r} unknown")
    return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def _ring(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    """Vertices at equal angular steps from `start_deg`, at the given radii."""
    angles = [math.radians(start_deg + 360.0 * k / len(radii)) for k in range(len(radii))]
    return [(rk * math.cos(t), rk * math.sin(t)) for rk, t in zip(radii, angles)]


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> np.ndarray:
    """Vertices (k, 2) in pixels of a polygonal shape centred on (cx, cy), circumradius r."""
    if shape == "square":
        pts = _ring([r] * 4, 45)
    elif shape == "diamond":  # a rhombus, taller than wide
        pts = [(0, -r), (0.65 * r, 0), (0, r), (-0.65 * r, 0)]
    elif shape == "triangle":
        pts = _ring([r] * 3, -90)
    elif shape == "hexagon":
        pts = _ring([r] * 6, 0)
    elif shape == "star":  # five points, inner radius 0.45 r
        pts = _ring([r, 0.45 * r] * 5, -90)
    elif shape == "cross":
        a, b = 0.3 * r, r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
               (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"shape {shape!r} is not polygonal")
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return np.asarray(pts) @ rot.T + np.array([cx, cy])


def _draw_shape(img: np.ndarray, o: SceneObject, size: int) -> None:
    shift = 4  # sub-pixel precision for cv2 drawing (coordinates × 16)
    scale = 1 << shift
    cx, cy, r = o.x * size, o.y * size, o.radius * size
    colour = tuple(float(v) for v in o.rgb)
    centre = (int(round(cx * scale)), int(round(cy * scale)))
    if o.shape == "circle":
        cv2.circle(img, centre, int(round(r * scale)), colour, -1, cv2.LINE_AA, shift)
    elif o.shape == "oval":
        axes = (int(round(r * scale)), int(round(0.55 * r * scale)))
        cv2.ellipse(img, centre, axes, o.angle, 0, 360, colour, -1, cv2.LINE_AA, shift)
    else:
        pts = np.round(shape_polygon(o.shape, cx, cy, r, o.angle) * scale).astype(np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, shift)


def make_scene(seed: int, size: int = 224, max_objects: int = 4) -> tuple[np.ndarray, Scene]:
    """(image, scene) for one seed."""
    scene = generate_scene(seed, max_objects=max_objects)
    return render_scene(scene, size), scene


def generate_split(split: str, n: int, size: int = 224, start: int = 0,
                   max_objects: int = 4) -> Iterator[tuple[np.ndarray, Scene]]:
    """Items start..start+n-1 of a fixed split ('train', 'validation', 'test') as (image, scene)."""
    for i in range(start, start + n):
        yield make_scene(split_seed(split, i), size=size, max_objects=max_objects)


# --------------------------------------------------------------------------- captions

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five",
                6: "six", 7: "seven", 8: "eight", 9: "nine"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "oval": "ovals", "cross": "crosses", "diamond": "diamonds", "hexagon": "hexagons"}
SHAPE_SYNONYMS = {"oval": ["oval", "oval", "ellipse"], "circle": ["circle", "circle", "disk"]}
SYNONYM_PLURALS = {"ellipse": "ellipses", "disk": "disks"}
SIZE_WORDS = {"small": ["small", "small", "little", "tiny"], "large": ["large", "large", "big"]}
POSITION_PHRASES = {
    corner: [f"in the {corner}", f"in the {corner} corner", f"at the {corner}",
             f"in the {corner.replace('top', 'upper').replace('bottom', 'lower')}"]
    for corner in ("top left", "top right", "bottom left", "bottom right")
} | {
    "top": ["at the top", "near the top"],
    "bottom": ["at the bottom", "near the bottom"],
    "left": ["on the left", "on the left side"],
    "right": ["on the right", "on the right side"],
    "center": ["in the center", "in the middle"],
}
RELATION_PHRASES = {
    "left of": ["to the left of", "left of"],
    "right of": ["to the right of", "right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "next to": ["next to", "beside"],
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng, colour: str, shape: str, size: str | None, count: int | None) -> str:
    """count None → definite ('the ...'); size None → no size word."""
    words = []
    if size is not None:
        words.append(_pick(rng, SIZE_WORDS[size]))
    words.append(colour)
    noun = _pick(rng, SHAPE_SYNONYMS.get(shape, [shape]))
    if count is not None and count > 1:
        noun = PLURALS.get(noun) or SYNONYM_PLURALS[noun]
    words.append(noun)
    body = " ".join(words)
    if count is None:
        return "the " + body
    if count == 1:
        det = _pick(rng, ["a", "a", "a", "one", "a single"])
        if det == "a" and body[0] in "aeiou":
            det = "an"
        return f"{det} {body}"
    return f"{NUMBER_WORDS[count]} {body}"


def caption_scene(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption stating every object's count, size, colour, shape, position and the scene's
    chosen relations, with wording varied by `rng` (default: seeded by the scene)."""
    if rng is None:
        rng = np.random.default_rng([scene.seed, 1])
    groups: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault(o.descriptor, []).append(i)
    objs = scene.objects
    pos = lambda i: _pick(rng, POSITION_PHRASES[objs[i].position])  # noqa: E731
    rel = lambda r: _pick(rng, RELATION_PHRASES[r])  # noqa: E731

    sentences, introduced = [], set()
    relations = list(scene.relations)
    keys = [list(groups)[int(k)] for k in rng.permutation(len(groups))]
    for key in keys:
        members = groups[key]
        if members[0] in introduced:
            continue
        o = objs[members[0]]
        if len(members) == 1:
            i = members[0]
            np_ = _noun_phrase(rng, o.colour, o.shape, o.size, 1)
            # Sometimes introduce a related, not yet introduced object in the same sentence.
            joint = next((r for r in relations if r[0] == i and r[2] not in introduced), None)
            if joint is not None and rng.random() < 0.4:
                j = joint[2]
                b = objs[j]
                np_b = _noun_phrase(rng, b.colour, b.shape, b.size, 1)
                opener = _pick(rng, ["", "there is ", "the image shows "])
                sentences.append(f"{opener}{np_} {pos(i)} {rel(joint[1])} {np_b} {pos(j)}")
                relations.remove(joint)
                introduced.update((i, j))
                continue
            form = int(rng.integers(4))
            if form == 0:
                sentences.append(f"there is {np_} {pos(i)}")
            elif form == 1:
                sentences.append(f"{pos(i)} there is {np_}")
            elif form == 2:
                sentences.append(f"{_pick(rng, ['i can see', 'the image shows', 'we see'])} {np_} {pos(i)}")
            else:
                sentences.append(f"{np_} {pos(i)}")
            introduced.add(i)
        else:
            np_ = _noun_phrase(rng, o.colour, o.shape, o.size, len(members))
            places = [f"one {pos(i)}" for i in members]
            last = places[-1].replace("one", _pick(rng, ["one", "another"]), 1)
            listed = ", ".join(places[:-1]) + " and " + last
            opener = _pick(rng, ["there are ", "", "i can see "])
            sentences.append(f"{opener}{np_}{_pick(rng, [': ', ', '])}{listed}")
            introduced.update(members)
    for i, r, j in relations:
        a, b = objs[i], objs[j]
        size_a = a.size if rng.random() < 0.3 else None
        size_b = b.size if rng.random() < 0.3 else None
        sentences.append(f"{_noun_phrase(rng, a.colour, a.shape, size_a, None)} is {rel(r)} "
                         f"{_noun_phrase(rng, b.colour, b.shape, size_b, None)}")
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


# --------------------------------------------------------------------------- facts

Fact = tuple


def _relation_fact(a: tuple[str, str], rel: str, b: tuple[str, str]) -> Fact:
    # One canonical form per meaning: "B right of A" is "A left of B", "below" is flipped "above",
    # and "next to" is symmetric.
    if rel == "right of":
        a, rel, b = b, "left of", a
    elif rel == "below":
        a, rel, b = b, "above", a
    elif rel == "next to" and b < a:
        a, b = b, a
    return ("relation", a[0], a[1], rel, b[0], b[1])


def _object_facts(colour: str, shape: str) -> set[Fact]:
    return {("colour", colour), ("shape", shape), ("object", colour, shape)}


def attribute_facts(scene: Scene) -> set[Fact]:
    """The facts a caption of this scene states: per colour+shape group its count, size and
    positions, plus the captioned relations (canonical direction)."""
    facts: set[Fact] = set()
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.descriptor, []).append(o)
    for (c, s), members in groups.items():
        facts |= _object_facts(c, s)
        facts.add(("count", c, s, len(members)))
        for o in members:
            facts.add(("size", c, s, o.size))
            facts.add(("position", c, s, o.position))
    for i, rel, j in scene.relations:
        facts.add(_relation_fact(scene.objects[i].descriptor, rel, scene.objects[j].descriptor))
    return facts


def true_facts(scene: Scene) -> set[Fact]:
    """Every fact that holds in the scene: `attribute_facts` plus every relation that holds
    between any two objects (used for precision, so a true but uncaptioned relation is no error)."""
    facts = {f for f in attribute_facts(scene) if f[0] != "relation"}
    for a in scene.objects:
        for b in scene.objects:
            if a is not b:
                for rel in true_relations(a, b):
                    facts.add(_relation_fact(a.descriptor, rel, b.descriptor))
    return facts


_COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple"}
_SIZE_WORDS = {w: s for s, ws in SIZE_WORDS.items() for w in ws} | {"big": "large"}
_SHAPE_WORDS = ({s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}
                | {"ellipse": "oval", "ellipses": "oval", "disk": "circle", "disks": "circle",
                   "disc": "circle", "discs": "circle", "rhombus": "diamond", "rhombuses": "diamond"})
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "a single": 1, "single": 1} | {
    w: n for n, w in NUMBER_WORDS.items() if n > 1}
_PLURAL_SHAPE_WORDS = set(PLURALS.values()) | {"ellipses", "disks", "discs", "rhombuses"}


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_REL_WORDS = {
    "to the left of": "left of", "left of": "left of", "on the left of": "left of",
    "to the right of": "right of", "right of": "right of", "on the right of": "right of",
    "above": "above", "over": "above",
    "below": "below", "under": "below", "underneath": "below", "beneath": "below",
    "next to": "next to", "beside": "next to",
}
_TOKEN_RE = re.compile(
    rf"(?P<rel>\b(?:{_alt(_REL_WORDS)})\b)"
    r"|(?P<pos>\b(?:in|at|on|near|towards?) the "
    r"(?:(?P<v>top|upper|bottom|lower)(?:[ -](?P<h1>left|right)(?!\s+of\b))?"
    r"|(?P<h2>left|right)|(?P<c>center|centre|middle))\b(?:\s+(?:side|corner|edge|part))?)"
    rf"|(?P<np>\b(?:(?P<det>the|{_alt(_COUNT_WORDS)})\s+)?(?:(?P<size>{_alt(_SIZE_WORDS)})\s+)?"
    rf"(?:(?P<colour>{_alt(_COLOUR_WORDS)})\s+)?(?P<shape>{_alt(_SHAPE_WORDS)})\b)"
    r"|(?P<ana>\b(?:one|another)\b)"
    r"|(?P<end>[.;!?])"
)


def _position_name(m: re.Match) -> str:
    if m.group("c"):
        return "center"
    if m.group("h2"):
        return m.group("h2")
    v = {"upper": "top", "lower": "bottom"}.get(m.group("v"), m.group("v"))
    return f"{v} {m.group('h1')}" if m.group("h1") else v


def parse_caption(text: str) -> set[Fact]:
    """Facts stated by a caption, comparable with `attribute_facts`; never fails on odd text.

    A position attaches to the latest object mentioned in its sentence (or the next one when it
    opens the sentence); "one"/"another" refer back to the latest coloured object; a relation
    links the object before it to the object after it.
    """
    facts: set[Fact] = set()
    last = None  # latest entity (colour, shape) or None
    last_full = None  # latest entity with a colour, for "one"/"another"
    pending_pos: list[str] = []
    pending_rel = None  # (subject entity, relation)
    for m in _TOKEN_RE.finditer(text.lower()):
        if m.group("end"):
            last = last_full = pending_rel = None
            pending_pos = []
            continue
        if m.group("rel"):
            pending_rel = (last, _REL_WORDS[m.group("rel")]) if last else None
            continue
        if m.group("pos"):
            if last:
                facts.add(("position", *last, _position_name(m)))
            else:
                pending_pos.append(_position_name(m))
            continue
        if m.group("np"):
            shape = _SHAPE_WORDS[m.group("shape")]
            facts.add(("shape", shape))
            colour = _COLOUR_WORDS.get(m.group("colour") or "")
            if colour is None:
                last = None
                continue
            entity = (colour, shape)
            facts |= _object_facts(colour, shape)
            det = m.group("det")
            if det in _COUNT_WORDS:
                plural = m.group("shape") in _PLURAL_SHAPE_WORDS
                n = _COUNT_WORDS[det]
                if (n > 1) == plural:
                    facts.add(("count", colour, shape, n))
            if m.group("size"):
                facts.add(("size", colour, shape, _SIZE_WORDS[m.group("size")]))
            for p in pending_pos:
                facts.add(("position", colour, shape, p))
            pending_pos = []
            if pending_rel is not None:
                facts.add(_relation_fact(pending_rel[0], pending_rel[1], entity))
                pending_rel = None
            last = last_full = entity
            continue
        last = last_full  # "one" / "another"
    return facts


def score_caption(text: str, scene: Scene) -> dict[str, float]:
    """Attribute precision (against every true fact), recall (against the captioned facts), F1."""
    predicted = parse_caption(text)
    reference = attribute_facts(scene)
    precision = len(predicted & true_facts(scene)) / len(predicted) if predicted else 0.0
    recall = len(predicted & reference) / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
