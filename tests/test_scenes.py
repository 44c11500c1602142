"""Procedural scenes: determinism, splits, that objects are really drawn, and the caption round trip."""
import json
import math

import numpy as np
import pytest

from bitmar_core.data.scenes import (COLOURS, POSITIONS, RELATIONS, SHAPES, Scene, SceneObject,
                                     attribute_facts, generate_scene, generate_split, make_scene,
                                     parse_caption, render_scene, score_caption, split_seed,
                                     true_facts, true_relations)


def _nearest_colour(pixel) -> str:
    return min(COLOURS, key=lambda c: sum((int(p) - q) ** 2 for p, q in zip(pixel, COLOURS[c])))


def test_same_seed_gives_identical_pixels_and_structure():
    img_a, scene_a = make_scene(123)
    img_b, scene_b = make_scene(123)
    np.testing.assert_array_equal(img_a, img_b)
    assert scene_a.to_dict() == scene_b.to_dict()
    img_c, _ = make_scene(124)
    assert not np.array_equal(img_a, img_c)
    assert img_a.shape == (224, 224, 3) and img_a.dtype == np.uint8
    assert make_scene(123, size=96)[0].shape == (96, 96, 3)


def test_splits_use_disjoint_seeds():
    seeds = {s: {split_seed(s, i) for i in (*range(500), 999_999_999)} for s in ("train", "validation", "test")}
    assert not seeds["train"] & seeds["validation"]
    assert not seeds["train"] & seeds["test"]
    assert not seeds["validation"] & seeds["test"]
    val = [scene.seed for _, scene in generate_split("validation", 3, size=64, start=5)]
    assert val == [1_000_000_005, 1_000_000_006, 1_000_000_007]
    with pytest.raises(ValueError, match="valid"):
        split_seed("valid", 0)
    with pytest.raises(ValueError, match="outside"):
        split_seed("train", 1_000_000_000)
    train_hashes = {img.tobytes() for img, _ in generate_split("train", 20, size=64)}
    test_hashes = {img.tobytes() for img, _ in generate_split("test", 20, size=64)}
    assert not train_hashes & test_hashes


@pytest.mark.parametrize("size", [224, 128])
def test_every_object_is_drawn_in_its_named_colour(size):
    checked = 0
    for seed in range(150):
        img, scene = make_scene(seed, size=size)
        for o in scene.objects:
            px = img[min(int(o.y * size), size - 1), min(int(o.x * size), size - 1)]
            assert _nearest_colour(px) == o.colour, (seed, o)
            assert np.abs(px.astype(int) - np.array(o.rgb)).max() <= 12, (seed, o, px)
            checked += 1
    assert checked > 300


def test_layout_matches_position_words_and_objects_never_overlap():
    for seed in range(300):
        scene = generate_scene(seed)
        assert 1 <= len(scene.objects) <= 4
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)
        for o in scene.objects:
            assert (math.floor(o.x * 3), math.floor(o.y * 3)) == tuple(o.cell)
            assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
        for i, rel, j in scene.relations:
            assert rel in true_relations(scene.objects[i], scene.objects[j])


def test_large_objects_cover_more_pixels_than_small_ones():
    YY, XX = np.mgrid[0:224, 0:224]
    area = {(shape, size): [] for shape in SHAPES for size in ("small", "large")}
    for seed in range(60):
        img, scene = make_scene(seed)
        for o in scene.objects:
            close = np.abs(img.astype(int) - np.array(o.rgb)).max(axis=2) <= 12
            near = np.hypot(XX - o.x * 224, YY - o.y * 224) <= o.radius * 224 + 2
            area[o.shape, o.size].append((close & near).sum())
    for shape in SHAPES:
        small, large = area[shape, "small"], area[shape, "large"]
        assert small and large and max(small) < min(large), shape
        # drawn area ≈ the shape's own area: a circle of the drawn radius, checked directly
        if shape == "circle":
            assert min(small) > np.pi * (0.055 * 224 - 1.5) ** 2


def test_caption_round_trip_recovers_the_ground_truth_facts():
    for seed in range(1500):
        scene = generate_scene(seed)
        parsed = parse_caption(scene.caption)
        assert parsed == attribute_facts(scene), (seed, scene.caption)
        assert parsed <= true_facts(scene)


def test_parse_caption_on_hand_written_text():
    text = ("There are two small green triangles: one on the left and another in the upper right. "
            "A big violet star at the bottom. The red disk is to the right of the large blue square.")
    assert parse_caption(text) == {
        ("shape", "triangle"), ("colour", "green"), ("object", "green", "triangle"),
        ("count", "green", "triangle", 2), ("size", "green", "triangle", "small"),
        ("position", "green", "triangle", "left"), ("position", "green", "triangle", "top right"),
        ("shape", "star"), ("colour", "purple"), ("object", "purple", "star"),
        ("count", "purple", "star", 1), ("size", "purple", "star", "large"),
        ("position", "purple", "star", "bottom"),
        ("shape", "circle"), ("colour", "red"), ("object", "red", "circle"),
        ("shape", "square"), ("colour", "blue"), ("object", "blue", "square"),
        ("size", "blue", "square", "large"),
        ("relation", "blue", "square", "left of", "red", "circle"),
    }
    assert parse_caption("") == set()
    assert parse_caption("one another . the the of on the left") == set()


def test_true_relations_from_cells():
    def obj(col, row):
        return SceneObject("red", "circle", "small", (col, row), 0, 0, 0.05, 0, (0, 0, 0))
    assert true_relations(obj(0, 1), obj(2, 1)) == {"left of"}
    assert true_relations(obj(1, 1), obj(1, 0)) == {"below", "next to"}
    assert true_relations(obj(0, 0), obj(1, 1)) == {"left of", "above", "next to"}
    assert true_relations(obj(2, 2), obj(0, 1)) == {"right of", "below"}


def test_score_caption_by_hand():
    scene = Scene(seed=0, objects=[
        SceneObject("red", "circle", "large", (0, 1), 0.15, 0.5, 0.1, 0, (220, 30, 30)),
        SceneObject("blue", "square", "small", (2, 1), 0.85, 0.5, 0.06, 0, (30, 70, 220))],
        relations=[(0, "left of", 1)], background={})
    assert score_caption("A large red circle on the left. A small blue square on the right. "
                         "The red circle is left of the blue square.", scene)["f1"] == 1.0
    # 5 true facts stated (shape circle, colour red, object, count, size) + 1 wrong (position):
    # precision 5/6; recall 5 of the 13 reference facts (2×(3 object + count + size + position) + 1 relation).
    s = score_caption("A large red circle at the top.", scene)
    assert s["precision"] == pytest.approx(5 / 6) and s["recall"] == pytest.approx(5 / 13)
    assert s["f1"] == pytest.approx(2 * (5 / 6) * (5 / 13) / (5 / 6 + 5 / 13))
    # A true relation the reference caption does not state costs no precision.
    s = score_caption("The blue square is right of the red circle. The red circle is next to the blue square.",
                      scene)
    # 3 facts per object + "left of" are true, "next to" is false (the cells are two apart)
    assert s["precision"] == pytest.approx(7 / 8)


def test_generator_covers_the_vocabulary_and_varies_wording():
    scenes = [generate_scene(s) for s in range(600)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.position for o in objs} == set(POSITIONS.values())
    assert {r for s in scenes for _, r, _ in s.relations} == set(RELATIONS)
    counts = {f[3] for s in scenes for f in attribute_facts(s) if f[0] == "count"}
    assert counts == {1, 2, 3, 4}
    assert {s.background["kind"] for s in scenes} == {"plain", "gradient", "noise", "stripes"}
    starts = {sentence.strip().lower()[:15] for s in scenes for sentence in s.caption.split(".")}
    for opener in ("there is a", "there are", "i can see", "the image shows", "we see", "in the", "at the"):
        assert any(st.startswith(opener) for st in starts), opener
    assert len(starts) > 100
    assert len({s.caption for s in scenes}) == len(scenes)


def test_scene_dict_survives_json_and_renders_the_same():
    img, scene = make_scene(77, size=96)
    again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    np.testing.assert_array_equal(render_scene(again, size=96), img)
    assert attribute_facts(again) == attribute_facts(scene)
