"""The shape-scene generator: determinism, answers that match what is drawn, the "where" rule."""

from __future__ import annotations

import random

import numpy as np
import pytest

from transprune.shapes import scenes


def _pixels(scene):
    return np.asarray(scene.render(), dtype=np.int16)


def test_same_seed_same_examples():
    first, second = scenes.dataset(3, 25), scenes.dataset(3, 25)
    assert [e.question for e in first] == [e.question for e in second]
    for a, b in zip(first, second):
        assert np.array_equal(_pixels(a.scene), _pixels(b.scene))
    other = scenes.dataset(4, 25)
    assert [e.question for e in first] != [e.question for e in other]


def test_question_types_cycle_and_templates():
    examples = scenes.dataset(0, 50)
    assert [e.question.qtype for e in examples[:5]] == list(scenes.QUESTION_TYPES)
    for example in examples:
        q = example.question
        assert q.answer in scenes.ANSWERS[q.qtype]
        assert all(word in scenes.vocabulary() for word in q.text.lower().replace("?", " ?").split())


def test_scene_invariants():
    rng = random.Random(0)
    for _ in range(300):
        scene = scenes.sample_scene(rng)
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
        for attribute in ("shape", "color", "cell"):
            values = [getattr(o, attribute) for o in scene.objects]
            assert len(set(values)) == len(values), f"{attribute} repeats: {values}"


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_recomputed_from_scene(seed):
    for example in scenes.dataset(seed, 500):
        assert scenes.answer(example.scene, example.question.text) == example.question.answer


def test_asked_colour_is_the_colour_drawn():
    """The pixels inside the asked-about object have the colour the answer names."""
    for example in scenes.dataset(5, 100):
        q = example.question
        if q.qtype != "color":
            continue
        shape = q.text.rstrip("?").split()[-1]
        index = next(i for i, o in enumerate(example.scene.objects) if o.shape == shape)
        mask = example.scene.object_map() == index + 1
        assert mask.sum() > 200
        mean = _pixels(example.scene)[mask].mean(axis=0)
        nearest = min(scenes.COLORS, key=lambda c: np.abs(mean - np.array(scenes.COLORS[c])).sum())
        assert nearest == q.answer


def test_where_rule_holds():
    """Each object lies wholly inside the 3x3 grid cell its "where" answer names."""
    rng = random.Random(1)
    for _ in range(200):
        scene = scenes.sample_scene(rng)
        object_map = scene.object_map()
        for i, obj in enumerate(scene.objects):
            ys, xs = np.nonzero(object_map == i + 1)
            row, col = scenes.CELLS[obj.cell]
            assert col * scenes.CELL <= xs.min() and xs.max() < (col + 1) * scenes.CELL
            assert row * scenes.CELL <= ys.min() and ys.max() < (row + 1) * scenes.CELL
    where = [e for e in scenes.dataset(2, 200) if e.question.qtype == "where"]
    for example in where:
        words = example.question.text.rstrip("?").split()
        obj = example.scene.find(color=words[-2], shape=words[-1])
        row, col = scenes.CELLS[example.question.answer]
        assert col * scenes.CELL <= obj.cx < (col + 1) * scenes.CELL
        assert row * scenes.CELL <= obj.cy < (row + 1) * scenes.CELL


def test_exists_is_balanced_and_no_means_absent():
    examples = [e for e in scenes.dataset(6, 1000) if e.question.qtype == "exists"]
    yes = sum(e.question.answer == "yes" for e in examples)
    assert 0.35 < yes / len(examples) < 0.65
    for example in examples:
        words = example.question.text.rstrip("?").split()
        present = example.scene.find(color=words[-2], shape=words[-1]) is not None
        assert present == (example.question.answer == "yes")


def test_patch_labels_follow_objects():
    scene = scenes.dataset(0, 1)[0].scene
    owners = scene.patch_objects(14)
    assert owners.shape == (144,)
    assert set(np.unique(owners)) <= set(range(-1, len(scene.objects)))
    for i in range(len(scene.objects)):
        assert (owners == i).sum() >= 2


def test_unknown_question_type_raises():
    scene = scenes.sample_scene(random.Random(0))
    with pytest.raises(ValueError, match="Unknown question type"):
        scenes.sample_question(scene, random.Random(0), "size")
