"""The compositional benchmark: held-out prompts, a near-perfect detector on exact renders, and non-vacuous scoring."""

import dataclasses
import json

import numpy as np
import pytest

from chromaflow.engine.evaluate import (CATEGORIES, METRICS, ObjSpec, benchmark_prompts, detect, evaluate,
                                        evaluate_ground_truth, markdown_table, sample_grid, score, spec_scene)
from chromaflow.engine.shapes import COLORS, SHAPES, ShapesDataset, render

PROMPTS = benchmark_prompts(n_per_category=24, seed=0)          # 24 x 3 categories x 3 languages = 216


def test_prompts_are_fixed_structured_and_held_out():
    assert len(PROMPTS) == 216 and benchmark_prompts(24, 0)[:9] == PROMPTS[:9]
    assert {p.category for p in PROMPTS} == set(CATEGORIES) and {p.language for p in PROMPTS} == {"en", "zh", "ru"}
    for group in range(0, len(PROMPTS), 3):                     # the three languages share one structured prompt
        a, b, c = PROMPTS[group:group + 3]
        assert a.objects == b.objects == c.objects and a.relation == b.relation == c.relation and a.language == "en"
        assert a.text == a.reference == b.reference
    assert all(p.relation for p in PROMPTS if p.category == "two")
    assert all(len(p.objects) in (2, 3) and len(set(p.objects)) == 1 for p in PROMPTS if p.category == "counting")
    train = {ShapesDataset(seed=0, size=16)[i][1] for i in range(300)}
    assert len({p.text for p in PROMPTS} - train) > 0.9 * len(PROMPTS)
    json.dumps([p.to_dict() for p in PROMPTS])


@pytest.mark.parametrize("size", [64, 128])
def test_ground_truth_renders_score_all_correct(size):
    report = evaluate_ground_truth(PROMPTS, size=size)
    json.dumps(report)
    assert report["overall"]["all_correct"] >= 0.99, markdown_table(report)
    assert set(report["by_category"]) == set(CATEGORIES) and set(report["by_language"]) == {"en", "zh", "ru"}
    assert report["by_category"]["single"]["relation"] is None and report["by_category"]["two"]["relation"] >= 0.99
    assert 0.99 <= report["overall"]["objects_per_asked"] <= 1.01  # every object found once


def test_detector_reads_a_render():
    spec = next(p for p in PROMPTS if p.category == "two" and p.objects[0].size)
    scene = spec_scene(spec, np.random.default_rng(0))
    dets = detect(render(scene, 128))
    assert len(dets) == 2
    for o in scene.objects:
        d = min(dets, key=lambda d: np.hypot(d.centre[0] - o.centre[0], d.centre[1] - o.centre[1]))
        assert (d.color, d.shape, d.size) == (o.color, o.shape, o.size)
        assert np.allclose(d.centre, o.centre, atol=0.02) and abs(d.longest - (o.bbox[2] - o.bbox[0])) < 0.02


def _scored(spec, wrong, size=64, seed=0):
    img = render(spec_scene(wrong, np.random.default_rng(seed)), size)
    return score(spec, detect(img))


def _other(value, choices):
    return next(c for c in choices if c != value)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_wrong_renders_are_scored_incorrect(category):
    for spec in [p for p in PROMPTS if p.category == category and p.language == "en"][:6]:
        assert _scored(spec, spec)["all_correct"]
        first = spec.objects[0]
        recolour = [dataclasses.replace(o, color=_other(o.color, COLORS)) if o == first else o for o in spec.objects]
        r = _scored(spec, dataclasses.replace(spec, objects=tuple(recolour)))
        assert not r["colour"] and not r["all_correct"]
        reshape = [dataclasses.replace(o, shape=_other(o.shape, SHAPES)) if o == first else o for o in spec.objects]
        if len(set(reshape)) == len(set(spec.objects)):          # the new shape must not equal the other object
            r = _scored(spec, dataclasses.replace(spec, objects=tuple(reshape)))
            assert not r["shape"] and not r["all_correct"]
        if first.size:
            resize = [dataclasses.replace(o, size=_other(o.size, ("small", "large"))) for o in spec.objects]
            r = _scored(spec, dataclasses.replace(spec, objects=tuple(resize)))
            assert not r["size"] and not r["all_correct"]
        if spec.relation:
            r = _scored(spec, dataclasses.replace(spec, objects=spec.objects[::-1]))
            assert not r["relation"] and not r["all_correct"]
        if category == "counting":
            n = len(spec.objects)
            r = _scored(spec, dataclasses.replace(spec, objects=(first,) * (5 - n)))   # 2 <-> 3
            assert not r["count"] and not r["all_correct"]


def test_score_handles_missing_objects_and_background():
    spec = next(p for p in PROMPTS if p.category == "two")
    assert not score(spec, [])["all_correct"] and not score(spec, [])["colour"]
    one = detect(render(spec_scene(dataclasses.replace(spec, objects=spec.objects[:1], relation=None),
                                   np.random.default_rng(0)), 64))
    r = score(spec, one)
    assert r["colour"] and not r["count"] and not r["relation"] and not r["all_correct"]
    white = dataclasses.replace(spec, background="white")
    assert not score(white, one, background="black")["all_correct"] and score(white, one, background="white")["colour"]


def test_evaluate_report_table_and_grid(tmp_path):
    prompts = PROMPTS[::12]

    def generate(texts):                        # a "model" that ignores the prompt: draws one red circle
        spec = dataclasses.replace(prompts[0], objects=(ObjSpec("circle", "red", "large"),), relation=None)
        return [render(spec_scene(spec, np.random.default_rng(len(t))), 64) for t in texts]

    report = evaluate(generate, prompts, batch_size=4, grid_path=str(tmp_path / "grid.png"))
    json.dumps(report)
    assert report["n"] == len(prompts) and set(report["overall"]) == {"n", *METRICS, "objects_per_asked"}
    assert report["overall"]["all_correct"] < 0.3
    table = markdown_table(report)
    assert table.count("\n") == 1 + 1 + len(report["by_category"]) + len(report["by_language"])
    assert (tmp_path / "grid.png").exists()
    grid = sample_grid([render(spec_scene(p, np.random.default_rng(0)), 64) for p in prompts[:5]],
                       ["два красных круга", "a b c " * 20, "x", "y", "z"], str(tmp_path / "g.png"), cols=2)
    assert grid.size == (128, 3 * (64 + 30))
