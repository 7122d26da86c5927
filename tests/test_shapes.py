"""The shapes world: determinism, exact colours, sizes, layout constraints, and en/zh/ru captions with agreement."""

import numpy as np
import pytest

from chromaflow.engine.shapes import (BACKGROUNDS, BORDER, COLORS, GAP, KINDS, LANGUAGES, RELATION_RATIO, SIZES, Obj,
                                      Scene, ShapesDataset,
                                      LABEL_HEADS, PAIRS, caption, caption_labels, describe, relation_holds, render,
                                      ru_phrase, sample_scene)

SCENES = [sample_scene(np.random.default_rng([123, i]), KINDS[i % 4]) for i in range(200)]


def test_items_are_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(seed=5, size=64), ShapesDataset(seed=5, size=64), ShapesDataset(seed=6, size=64)
    for i in (0, 7, 123456):
        (img1, t1), (img2, t2) = a[i], b[i]
        assert t1 == t2 and np.array_equal(np.asarray(img1), np.asarray(img2))
    assert [a[i][1] for i in range(5)] != [c[i][1] for i in range(5)]
    x, text = ShapesDataset(seed=5, size=32, as_tensor=True)[7]
    assert tuple(x.shape) == (3, 32, 32) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0 and text == a[7][1]


def test_centre_jitter_moves_each_group_as_a_whole_to_near_the_centre():
    uniform, centred = ShapesDataset(seed=3), ShapesDataset(seed=3, centre_jitter=0.05)
    spread = []
    for i in range(300):
        (a, _), (b, _) = uniform.scene(i), centred.scene(i)
        assert [(o.shape, o.color, o.size) for o in a.objects] == [(o.shape, o.color, o.size) for o in b.objects]
        shift = np.subtract(b.objects[0].bbox, a.objects[0].bbox)
        for oa, ob in zip(a.objects, b.objects):  # one translation for the whole group
            assert np.allclose(np.subtract(ob.bbox, oa.bbox), shift, atol=1e-9)
            assert BORDER - 1e-9 <= min(ob.bbox) and max(ob.bbox) <= 1 - BORDER + 1e-9
        centre = [(min(o.bbox[k] for o in b.objects) + max(o.bbox[k + 2] for o in b.objects)) / 2 for k in (0, 1)]
        assert np.abs(np.subtract(centre, 0.5)).max() <= 0.05 + 1e-9
        spread.append(centre)
        if b.relation:
            assert relation_holds(b.relation, b.objects[0].centre, b.objects[1].centre, RELATION_RATIO)
    assert np.std(spread) > 0.02  # jittered, not pinned
    with pytest.raises(ValueError, match="centre_jitter"):
        ShapesDataset(centre_jitter=0.7)


def test_gap_keeps_objects_that_far_apart_and_the_same_objects_are_drawn():
    def distance(a, b):  # between two bboxes: the larger of the axis gaps (negative when they overlap)
        return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
    near, far = ShapesDataset(seed=4), ShapesDataset(seed=4, gap=0.12, centre_jitter=0.05)
    least = []
    for i in range(300):
        (a, _), (b, _) = near.scene(i), far.scene(i)
        assert [(o.shape, o.color, o.size) for o in a.objects] == [(o.shape, o.color, o.size) for o in b.objects]
        least += [distance(p.bbox, q.bbox) for k, p in enumerate(b.objects) for q in b.objects[k + 1:]]
        if b.relation:
            assert relation_holds(b.relation, b.objects[0].centre, b.objects[1].centre, RELATION_RATIO)
    assert min(least) >= 0.12 - 1e-9 and np.mean(np.array(least) < 0.15) > 0.1  # the bound is reached, not far off
    assert min(distance(p.bbox, q.bbox) for scene in SCENES for k, p in enumerate(scene.objects)
               for q in scene.objects[k + 1:]) < 0.12  # the default gap (GAP) lets them come closer
    for bad in (0.3, -0.01, "wide"):
        with pytest.raises(ValueError, match="gap"):
            ShapesDataset(gap=bad)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_interiors_have_exact_colours_and_background(size):
    for scene in SCENES[:40]:
        a = np.asarray(render(scene, size))
        assert a.shape == (size, size, 3)
        assert tuple(a[0, 0]) == BACKGROUNDS[scene.background]
        for o in scene.objects:
            cx, cy = o.centre
            if o.shape == "star":                   # the bbox centre of a star can fall between two arms
                cy = o.bbox[1] + (o.bbox[3] - o.bbox[1]) * 0.55
            assert tuple(a[int(cy * size), int(cx * size)]) == COLORS[o.color]


def test_sizes_layout_and_relations():
    for scene in SCENES:
        assert 1 <= len(scene.objects) <= 3
        for o in scene.objects:
            lo, hi = SIZES[o.size]
            x0, y0, x1, y1 = o.bbox
            assert lo - 1e-9 <= max(x1 - x0, y1 - y0) <= hi + 1e-9
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:         # bboxes apart by at least GAP along some axis
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= GAP - 1e-9
        if scene.relation:
            a, b = scene.objects
            assert relation_holds(scene.relation, a.centre, b.centre, ratio=1.5)
            assert not relation_holds(scene.relation, b.centre, a.centre)
    kinds = {s.kind for s in SCENES}
    assert kinds == set(KINDS)
    counts = [len(s.objects) for s in SCENES if s.kind == "count"]
    assert set(counts) == {2, 3}
    assert all(len({(o.shape, o.color, o.size) for o in s.objects}) == 1 for s in SCENES if s.kind == "count")


def test_russian_agreement():
    assert ru_phrase("star", "red", count=2) == "две красные звезды"
    assert ru_phrase("square", "blue", count=3) == "три синих квадрата"
    assert ru_phrase("circle", "red", count=2) == "два красных круга"
    assert ru_phrase("star", "blue", "small", count=3) == "три маленькие синие звезды"
    assert ru_phrase("triangle", "green", "large", count=2) == "два больших зелёных треугольника"
    assert ru_phrase("circle", "yellow", count=1) == "один жёлтый круг"
    assert ru_phrase("star", "orange", count=1) == "одна оранжевая звезда"
    assert ru_phrase("square", "blue", "small", case="gen") == "маленького синего квадрата"
    assert ru_phrase("star", "blue", "large", case="gen") == "большой синей звезды"
    assert ru_phrase("star", "purple", case="ins") == "фиолетовой звездой"
    assert ru_phrase("circle", "blue", case="ins") == "синим кругом"
    assert ru_phrase("star", "blue", case="acc") == "синюю звезду"


def _scene(kind, shape, color, n=1, relation=None, size="small"):
    objs = [Obj(shape, color, size, (0.1 + 0.3 * i, 0.4, 0.25 + 0.3 * i, 0.55)) for i in range(n)]
    return Scene(objs, "default", relation, kind)


def _pair(second, background):            # a red circle left of a blue `second`
    objs = [Obj("circle", "red", "small", (0.1, 0.4, 0.2, 0.5)), Obj(second, "blue", "small", (0.6, 0.4, 0.7, 0.5))]
    return Scene(objs, background, "left of", "relation")


def test_russian_captions_agree_in_context():
    rng = np.random.default_rng(0)
    for _ in range(30):
        text = describe(_scene("count", "star", "red", 2), "ru", rng, sized=False).lower()
        assert ("две красные звезды" in text) or ("2 красные звезды" in text), text
        text = describe(_scene("count", "square", "blue", 3), "ru", rng, sized=True)
        assert "синих квадрата" in text and ("три" in text.lower() or "3" in text), text
    rel = _pair("square", "default")
    seen = set()
    for _ in range(60):
        text = describe(rel, "ru", rng, sized=False).lower()
        seen.add(text)
        assert any(p in text for p in ("слева от синего квадрата", "левее синего квадрата",
                                       "справа от красного круга", "правее красного круга")), text
    assert len(seen) >= 8


def test_captions_cover_languages_and_name_the_right_words():
    rng = np.random.default_rng(1)
    langs = [caption(s, rng)[1] for s in SCENES]
    assert set(langs) == set(LANGUAGES)
    words = {"en": {"red": "red", "blue": "blue", "circle": "circle", "star": "star",
                    "small": ("small", "tiny", "little")},
             "zh": {"red": "红色", "blue": "蓝色", "circle": "圆形", "star": "五角星", "small": ("小",)},
             "ru": {"red": "красн", "blue": "син", "circle": "круг", "star": "звезд", "small": ("маленьк", "крошечн")}}
    rel = _pair("star", "white")
    for lang, w in words.items():
        texts = {describe(rel, lang, rng, sized=True, split=split) for _ in range(40) for split in ("train", "eval")}
        assert len(texts) >= 12
        for t in texts:
            low = t.lower()
            assert all(w[k] in low for k in ("red", "blue", "circle")), t
            assert w["star"] in low or (lang == "ru" and "звёзд" in low), t
            assert any(s in low for s in w["small"]), t
            assert any(b in low for b in {"en": ("white",), "zh": ("白色",), "ru": ("белом", "белый")}[lang]), t
        plain = describe(rel, lang, rng, sized=False)
        assert not any(s in plain for s in w["small"]), plain
    assert describe(_scene("count", "circle", "orange", 3), "zh", np.random.default_rng(2), sized=False) \
        .replace("3个", "三个").find("三个橙色的圆形") >= 0


def test_caption_labels_state_content_independent_of_word_order():
    swapped = _pair("star", "white")
    swapped.objects.reverse()
    swapped.relation = "right of"  # the blue star right of the red circle: the same picture, said the other way
    labels = caption_labels(_pair("star", "white"), sized=True)
    assert labels == caption_labels(swapped, sized=True)
    assert len(labels) == sum(n for _, _, n in LABEL_HEADS)
    n = len(PAIRS)
    red_circle, blue_star = PAIRS.index(("red", "circle")), PAIRS.index(("blue", "star"))
    assert [i for i, c in enumerate(labels[:n]) if c] == sorted([red_circle, blue_star])
    assert labels[n + red_circle] == 1 + list(SIZES).index("small")
    assert caption_labels(_pair("star", "white"), sized=False)[n:2 * n] == [0] * n  # unnamed sizes are not a label
    assert labels[-1] == list(BACKGROUNDS).index("white")
    three = caption_labels(_scene("count", "circle", "orange", 3), sized=False)
    assert three[PAIRS.index(("orange", "circle"))] == 3 and three[2 * n] == 0  # a count, no relation


def test_shape_labels_mark_each_objects_pixels_with_its_shape():
    from chromaflow.engine.shapes import SHAPES, shape_labels
    for scene in SCENES[:40]:
        labels, image = shape_labels(scene, 128), np.asarray(render(scene, 128)).astype(int)
        assert labels.shape == (128, 128)
        assert set(np.unique(labels)) == {0} | {1 + SHAPES.index(o.shape) for o in scene.objects}
        off_background = np.abs(image - BACKGROUNDS[scene.background]).sum(-1) > 0
        assert ((labels > 0) == off_background).mean() > 0.97  # they differ only on anti-aliased edge pixels
    world = ShapesDataset(seed=5, size=64)
    assert np.array_equal(world.labels(7), shape_labels(world.scene(7)[0], 64))


def test_caption_owners_mark_each_objects_phrase():
    words = {"en": ("red", "circle", "blue", "star"), "zh": ("红色", "圆形", "蓝色", "五角星"),
             "ru": ("красн", "круг", "син", "зв")}
    rel = _pair("star", "black")  # the red circle (object 0) left of the blue star (object 1)
    for lang, (red, circle, blue, star) in words.items():
        for seed in range(40):
            text, owners = describe(rel, lang, np.random.default_rng(seed), split="eval", with_owners=True)
            assert text == describe(rel, lang, np.random.default_rng(seed), split="eval")  # same draws, same text
            assert len(owners) == len(text)
            phrase = {k: "".join(c for c, o in zip(text.lower(), owners) if o == k) for k in (-1, 0, 1)}
            assert red in phrase[0] and circle in phrase[0] and blue not in phrase[0], (text, phrase)
            assert blue in phrase[1] and star in phrase[1] and red not in phrase[1], (text, phrase)
            assert not any(w in phrase[-1] for w in (red, circle, blue, star)), (text, phrase)  # background, etc.
