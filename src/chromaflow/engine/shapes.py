"""Procedural "shapes world" for the built-in model: scenes, anti-aliased renders and en/zh/ru captions, all by seed.

Geometry is in canvas-relative units ([0, 1] on both axes), so one Scene renders at any resolution. Every object is
described by its shape, colour, size class and bbox; `centre` is the bbox centre (the evaluator uses the same point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 50, 50), "green": (50, 170, 80), "blue": (50, 90, 220),
          "yellow": (240, 200, 40), "purple": (150, 70, 190), "orange": (245, 140, 40)}
SIZES = {"small": (0.12, 0.20), "large": (0.30, 0.45)}          # longest bbox side / canvas side
BACKGROUNDS = {"default": (245, 245, 240), "white": (255, 255, 255), "black": (20, 20, 20), "gray": (128, 128, 128)}
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "two", "relation", "count")
KIND_WEIGHTS = (0.3, 0.2, 0.25, 0.25)
LANGUAGES = ("en", "zh", "ru")

BORDER = 0.03        # free frame around the canvas edge
GAP = 0.05           # minimum gap between two bboxes (keeps same-colour objects separable after blur)
MAX_GAP = 0.15       # the widest a dataset may ask for: three large objects must still fit
RELATION_RATIO = 1.5  # |offset along the named axis| >= ratio * |offset along the other axis|
STAR_INNER = 0.4     # inner / outer radius of the 5-point star
SUPERSAMPLE = 4

_S72, _C36 = math.sin(math.radians(72)), math.cos(math.radians(36))
_STAR_R = 1 / (2 * _S72)                                       # outer radius for a star of width 1
_STAR_H = _STAR_R * (1 + _C36)                                 # its height
# per shape: (height / width, area / (width * height), centroid depth / height) -- width is the longest side
GEOMETRY = {"circle": (1.0, math.pi / 4, 0.5), "square": (1.0, 1.0, 0.5),
            "triangle": (math.sqrt(3) / 2, 0.5, 2 / 3),
            "star": (_STAR_H, 5 * _STAR_R ** 2 * STAR_INNER * math.sin(math.radians(36)) / _STAR_H, _STAR_R / _STAR_H)}


@dataclass
class Obj:
    shape: str
    color: str
    size: str                                   # "small" | "large"
    bbox: tuple[float, float, float, float]     # x0, y0, x1, y1 in canvas units

    @property
    def centre(self) -> tuple[float, float]:
        return _centre(self.bbox)


@dataclass
class Scene:
    objects: list[Obj]
    background: str = "default"
    relation: str | None = None                 # objects[0] <relation> objects[1]
    kind: str = "single"


# --- geometry and layout --------------------------------------------------------------------------------------

def shape_box(shape: str, side: float, cx: float, cy: float) -> tuple[float, float, float, float]:
    """The bbox of `shape` with longest side `side` centred (bbox centre) at (cx, cy)."""
    h = GEOMETRY[shape][0] * side
    return (cx - side / 2, cy - h / 2, cx + side / 2, cy + h / 2)


def _separated(a, b, gap=GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], ratio: float = 1.0) -> bool:
    """Whether centre `a` is <relation> centre `b` (image y grows downwards), dominating the other axis by `ratio`."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    along, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > 0 and along >= ratio * abs(other)


def place(rng: np.random.Generator, items, relation: str | None = None, background: str = "default",
          kind: str | None = None, gap: float = GAP) -> Scene:
    """Lay out (shape, colour, size class) items without overlap, at least `gap` apart (bboxes), inside the canvas,
    satisfying `relation`."""
    for _ in range(2000):
        boxes = []
        for shape, _color, size in items:
            side = rng.uniform(*SIZES[size])
            w, h = side, GEOMETRY[shape][0] * side
            for _try in range(25):
                box = shape_box(shape, side, rng.uniform(BORDER + w / 2, 1 - BORDER - w / 2),
                                rng.uniform(BORDER + h / 2, 1 - BORDER - h / 2))
                ok = all(_separated(box, other, gap) for other in boxes)
                if ok and relation and len(boxes) == 1:
                    ok = relation_holds(relation, _centre(boxes[0]), _centre(box), RELATION_RATIO) and \
                        _separated_along(relation, box, boxes[0], gap)
                if ok:
                    boxes.append(box)
                    break
            else:
                break                               # resample all sizes: this combination may not fit
        if len(boxes) == len(items):
            objs = [Obj(s, c, z, tuple(float(v) for v in b)) for (s, c, z), b in zip(items, boxes)]
            return Scene(objs, background, relation, kind or ("single" if len(objs) == 1 else "two"))
    raise RuntimeError(f"cannot place {items} with relation {relation}")


def _centre(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def centre_group(scene: Scene, rng: np.random.Generator, jitter: float) -> Scene:
    """Translate all of a scene's objects together so their joint bbox sits at the canvas centre, moved by up to
    +-`jitter` on each axis (kept inside the frame). Sizes, gaps and relations are unchanged; only where the group
    lies is no longer uniform, so a caption (which never names a place) determines far more of the image."""
    lo = [min(o.bbox[i] for o in scene.objects) for i in (0, 1)]
    hi = [max(o.bbox[i + 2] for o in scene.objects) for i in (0, 1)]
    shift = [min(max(0.5 - (lo[i] + hi[i]) / 2 + rng.uniform(-jitter, jitter), BORDER - lo[i]), 1 - BORDER - hi[i])
             for i in (0, 1)]
    for o in scene.objects:
        o.bbox = (o.bbox[0] + shift[0], o.bbox[1] + shift[1], o.bbox[2] + shift[0], o.bbox[3] + shift[1])
    return scene


def _separated_along(relation, a, b, gap=GAP) -> bool:
    """The bboxes themselves are apart along the named axis, so the relation holds for every point of them."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0]) if relation in ("left of", "right of") \
        else (a[3] + gap <= b[1] or b[3] + gap <= a[1])


def sample_scene(rng: np.random.Generator, kind: str | None = None, kind_weights=None, gap: float = GAP) -> Scene:
    """A random scene; kind: single (1 object), two (2, no relation), relation (2 + relation), count (2-3 identical),
    drawn with `kind_weights` over KINDS (None: KIND_WEIGHTS) unless given; objects at least `gap` apart."""
    if kind is None:
        weights = _normalise(KIND_WEIGHTS if kind_weights is None else kind_weights, len(KINDS))
        kind = KINDS[int(rng.choice(len(KINDS), p=weights))]
    colors, sizes = list(COLORS), list(SIZES)
    first = (_pick(rng, SHAPES), _pick(rng, colors), _pick(rng, sizes))
    if kind == "single":
        items = [first]
    elif kind == "count":
        items = [first] * int(rng.integers(2, 4))
    else:
        while (second := (_pick(rng, SHAPES), _pick(rng, colors), _pick(rng, sizes)))[:2] == first[:2]:
            pass                                                        # two distinct (shape, colour) objects
        items = [first, second]
    relation = _pick(rng, RELATIONS) if kind == "relation" else None
    background = "default" if rng.random() < 0.75 else _pick(rng, ("white", "black", "gray"))   # a named minority
    return place(rng, items, relation, background, kind, gap)


# --- rendering --------------------------------------------------------------------------------------------------

def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """Draw `shape` filling pixel-space `box` (x0, y0, x1, y1) on a PIL canvas."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        r = (x1 - x0) * _STAR_R
        cx, cy = (x0 + x1) / 2, y0 + r
        draw.polygon([(cx + (r if k % 2 == 0 else r * STAR_INNER) * math.sin(math.pi * k / 5),
                       cy - (r if k % 2 == 0 else r * STAR_INNER) * math.cos(math.pi * k / 5)) for k in range(10)],
                     fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 256) -> Image.Image:
    """Render at SUPERSAMPLE x and box-downsample: flat colours inside, exact-coverage anti-aliasing at edges."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_shape(draw, o.shape, [v * big for v in o.bbox], COLORS[o.color])
    return img.reduce(SUPERSAMPLE)


def shape_labels(scene: Scene, size: int = 256) -> np.ndarray:
    """(size, size) uint8 map of which shape covers each pixel: 0 background, 1 + its SHAPES index inside an
    object (aliased): dense targets for the trainer's `label_loss`."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_shape(draw, o.shape, [v * size for v in o.bbox], 1 + SHAPES.index(o.shape))
    return np.asarray(img)


def coverage(shape: str, box, hw: tuple[int, int], draw=draw_shape) -> np.ndarray:
    """Fractional pixel coverage (H, W) of `shape` in pixel-space `box`, anti-aliased exactly like `render`;
    `draw(draw, shape, box, fill)` may draw shapes beyond the world's four."""
    h, w = hw
    mask = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw(ImageDraw.Draw(mask), shape, [v * SUPERSAMPLE for v in box], 255)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


# --- captions ---------------------------------------------------------------------------------------------------
# Words per language. Templates are str.format strings over the slots built by _slots; each kind has a train list
# and a held-out list that only split="eval" uses.

_EN = {"circle": "circle", "square": "square", "triangle": "triangle", "star": "star",
       "small": ("small", "tiny", "little"), "large": ("large", "big", "huge"),
       "left of": ("to the left of", "left of", "on the left side of"),
       "right of": ("to the right of", "right of", "on the right side of"),
       "above": ("above", "over", "higher than"), "below": ("below", "under", "beneath", "lower than"),
       "bg": {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")},
       "bg_t": (" on a {} background", " against a {} background", " in front of a {} background", ", {} background"),
       "num": {1: "one", 2: "two", 3: "three"}}
_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星",
       "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
       "small": ("小",), "large": ("大",),
       "left of": ("左边", "左侧", "左方"), "right of": ("右边", "右侧", "右方"),
       "above": ("上方", "上面", "上边"), "below": ("下方", "下面", "下边"),
       "bg": {"white": ("白色",), "black": ("黑色",), "gray": ("灰色",)},
       "bg_t": ("，{}背景", "，背景是{}的", "，背景为{}", "，在{}背景上"),
       "num": {1: "一", 2: "两", 3: "三"}}
# Russian nouns: gender + singular cases (nominative, genitive, accusative, instrumental).
_RU_NOUN = {"circle": ("m", "круг", "круга", "круг", "кругом"),
            "square": ("m", "квадрат", "квадрата", "квадрат", "квадратом"),
            "triangle": ("m", "треугольник", "треугольника", "треугольник", "треугольником"),
            "star": ("f", "звезда", "звезды", "звезду", "звездой")}
_CASES = ("nom", "gen", "acc", "ins")
# adjective endings by stem type -> (m, f, pl) x (nom, gen, acc, ins); inanimate accusative
_RU_END = {"hard": (("ый", "ого", "ый", "ым"), ("ая", "ой", "ую", "ой"), ("ые", "ых", "ые", "ыми")),
           "soft": (("ий", "его", "ий", "им"), ("яя", "ей", "юю", "ей"), ("ие", "их", "ие", "ими")),
           "velar": (("ий", "ого", "ий", "им"), ("ая", "ой", "ую", "ой"), ("ие", "их", "ие", "ими")),
           "stressed": (("ой", "ого", "ой", "им"), ("ая", "ой", "ую", "ой"), ("ие", "их", "ие", "ими"))}
_RU_ADJ = {"red": ("красн", "hard"), "green": ("зелён", "hard"), "blue": ("син", "soft"), "yellow": ("жёлт", "hard"),
           "purple": ("фиолетов", "hard"), "orange": ("оранжев", "hard"),
           "small": (("маленьк", "velar"), ("крошечн", "hard")), "large": (("больш", "stressed"), ("огромн", "hard"))}
_RU_NUM = {1: {"m": ("один", "одного", "один", "одним"), "f": ("одна", "одной", "одну", "одной")},
           2: {"m": ("два",) * 4, "f": ("две",) * 4}, 3: {"m": ("три",) * 4, "f": ("три",) * 4}}
_RU_REL = {"left of": (("слева от", "gen"), ("левее", "gen")), "right of": (("справа от", "gen"), ("правее", "gen")),
           "above": (("над", "ins"), ("выше", "gen")), "below": (("под", "ins"), ("ниже", "gen"))}
# short participles/adjectives agreeing with the subject: m, f, pl
_RU_AGREE = {"drawn": ("нарисован", "нарисована", "нарисованы"), "shown": ("изображён", "изображена", "изображены"),
             "placed": ("расположен", "расположена", "расположены"), "seen": ("виден", "видна", "видны")}
_RU_BG = {"white": ("белом", "белый"), "black": ("чёрном", "чёрный"), "gray": ("сером", "серый")}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def ru_adjective(word: str, gender: str, case: str, variant: int = 0) -> str:
    """Decline a colour/size adjective: gender in m/f/pl, case in nom/gen/acc/ins (inanimate accusative)."""
    stem, kind = _RU_ADJ[word] if word in COLORS else _RU_ADJ[word][variant]
    return stem + _RU_END[kind][("m", "f", "pl").index(gender)][_CASES.index(case)]


def ru_phrase(shape: str, color: str, size: str | None = None, count: int | None = None, case: str = "nom",
              variant: int = 0) -> str:
    """Russian noun phrase with agreement; variant picks the size synonym (маленький/крошечный, большой/огромный).

    count None: no numeral; 1: один/одна + singular; 2-3 (nominative = inanimate accusative): два/две/три + genitive
    singular noun, adjectives in genitive plural for masculine nouns ("три синих квадрата") and nominative plural for
    feminine ones ("две красные звезды"), the standard modern usage.
    """
    gender, *forms = _RU_NOUN[shape]
    adjectives = ((size,) if size else ()) + (color,)
    if count in (2, 3):
        assert case in ("nom", "acc"), "numerals 2-3 are only used in nominative/accusative phrases"
        agree = ("pl", "gen") if gender == "m" else ("pl", "nom")
        return " ".join([_RU_NUM[count][gender][0], *(ru_adjective(w, *agree, variant) for w in adjectives), forms[1]])
    c = _CASES.index(case)
    numeral = [_RU_NUM[1][gender][c]] if count == 1 else []
    return " ".join(numeral + [ru_adjective(w, gender, case, variant) for w in adjectives] + [forms[c]])


def _en_np(o: Obj, sized: bool, rng, det: str = "a", count: int = 1) -> str:
    words = ([_pick(rng, _EN[o.size])] if sized else []) + [o.color, _EN[o.shape] + ("s" if count > 1 else "")]
    if det == "a":
        det = "an" if words[0][0] in "aeiou" else "a"
    elif det == "num":
        det = _EN["num"][count]
    elif det == "digit":
        det = str(count)
    return " ".join([det] + words)


def _zh_np(o: Obj, sized: bool, form: str = "num", count: int = 1) -> str:
    size = _ZH[o.size][0] if sized else ""
    if form == "compact":
        return f"{_ZH[o.color]}{size}{_ZH[o.shape]}"
    bare = f"{_ZH[o.color]}的{size}{_ZH[o.shape]}"
    return {"bare": bare, "num": f"{_ZH['num'][count]}个{bare}", "digit": f"{count}个{bare}"}[form]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _slots(lang: str, scene: Scene, sized: bool, rng) -> dict:
    objs, n = scene.objects, len(scene.objects)
    s = {}
    if lang == "en":
        for key, o in zip("ab", objs):
            s[key] = _en_np(o, sized, rng)
        s["one"] = _en_np(objs[0], sized, rng, "one")
        s["n"] = _en_np(objs[0], sized, rng, "num", n)
        s["d"] = _en_np(objs[0], sized, rng, "digit", n)
        if scene.relation:
            s["rel"], s["inv"] = (_pick(rng, _EN[r]) for r in (scene.relation, INVERSE[scene.relation]))
    elif lang == "zh":
        for key, o in zip("ab", objs):
            for form in ("num", "bare", "compact"):
                s[f"{key}_{form}"] = _zh_np(o, sized, form)
        s["n_num"], s["n_digit"] = (_zh_np(objs[0], sized, f, n) for f in ("num", "digit"))
        if scene.relation:
            s["pos"], s["inv"] = (_pick(rng, _ZH[r]) for r in (scene.relation, INVERSE[scene.relation]))
    else:
        for key, o in zip("AB", objs):
            size, var = (o.size if sized else None), int(rng.integers(2))
            for case in _CASES:
                slot = key if case == "nom" else f"{key}_{case}"
                s[slot] = ru_phrase(o.shape, o.color, size, case=case, variant=var)
            s[key + "_one"] = ru_phrase(o.shape, o.color, size, count=1, variant=var)
        o = objs[0]
        number = ("m", "f", "pl").index("pl" if scene.kind == "count" else _RU_NOUN[o.shape][0])  # subject: A or N
        s.update({k: v[number] for k, v in _RU_AGREE.items()})
        if n > 1 and not scene.relation:
            s["N"] = ru_phrase(o.shape, o.color, o.size if sized else None, count=n, variant=int(rng.integers(2)))
            s["N_digit"] = str(n) + s["N"][s["N"].index(" "):]
        if scene.relation:
            (prep, case), (iprep, icase) = (_pick(rng, _RU_REL[r]) for r in (scene.relation, INVERSE[scene.relation]))
            s["rel_B"] = f"{prep} {s['B_' + case]}"
            s["inv_A"] = f"{iprep} {s['A_' + icase]}"
    return s


# (train templates, eval-only templates) per language and caption kind
_TEMPLATES = {
    "en": {
        "single": (["{a}", "a picture of {a}", "an image of {a}", "a simple drawing of {a}",
                    "there is {a} in the picture", "{one}", "a photo of {a}", "{a}, flat illustration",
                    "a clean flat render of {a}", "just {one}"],
                   ["a rendering that shows {a}", "a canvas containing {one}", "{a} in the frame"]),
        "two": (["{a} and {b}", "a picture of {a} and {b}", "an image with {a} and {b}", "{a} together with {b}",
                 "{a} as well as {b}", "two shapes: {a} and {b}", "there are {a} and {b}",
                 "a simple drawing of {a} and {b}", "{a} plus {b}"],
                ["a rendering that shows {a} and {b}", "a canvas containing {a} and also {b}"]),
        "relation": (["{a} {rel} {b}", "a picture of {a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}",
                      "an image of {a} placed {rel} {b}", "{b} {inv} {a}", "{a} sitting {rel} {b}",
                      "a simple drawing: {a} {rel} {b}", "{a}, positioned {rel} {b}"],
                     ["a rendering where {a} appears {rel} {b}", "{b}, with {a} {rel} it"]),
        "count": (["{n}", "a picture of {n}", "there are {n}", "exactly {n}", "an image of {n}", "a group of {n}",
                   "{d}", "a simple drawing of {n}", "{n} on the canvas"],
                  ["a rendering that shows {n}", "{n} in total"]),
    },
    "zh": {
        "single": (["{a_num}", "画面中有{a_num}", "一张图片，上面有{a_num}", "图中是{a_num}", "这是{a_num}",
                    "一幅画，画着{a_num}", "只有{a_num}", "{a_num}，简单的插图", "画了{a_num}", "{a_bare}"],
                   ["请画出{a_num}", "可以看到{a_num}"]),
        "two": (["{a_num}和{b_num}", "画面中有{a_num}和{b_num}", "{a_num}以及{b_num}", "一张图片，上面有{a_num}和{b_num}",
                 "图中是{a_num}与{b_num}", "这里有{a_num}，还有{b_num}", "画了{a_num}和{b_num}", "{a_bare}和{b_bare}"],
                ["请画出{a_num}和{b_num}", "可以看到{a_num}与{b_num}"]),
        "relation": (["{a_bare}在{b_compact}的{pos}", "{a_num}位于{b_compact}的{pos}", "{b_compact}的{pos}有{a_num}",
                      "画面中，{a_bare}在{b_bare}的{pos}", "一张图片：{a_num}在{b_compact}的{pos}",
                      "{a_bare}放在{b_compact}的{pos}", "{a_compact}处于{b_compact}的{pos}", "{b_bare}在{a_compact}的{inv}"],
                     ["请画出{a_num}，它在{b_compact}的{pos}", "可以看到{a_bare}在{b_compact}的{pos}"]),
        "count": (["{n_num}", "画面中有{n_num}", "一共有{n_num}", "图中是{n_num}", "正好{n_num}", "一张图片，上面有{n_num}",
                   "这里有{n_num}", "画了{n_num}", "{n_digit}"],
                  ["请画出{n_num}", "数一数：{n_num}"]),
    },
    "ru": {
        "single": (["{A}", "{A_one}", "картинка: {A}", "на картинке {A}", "здесь {drawn} {A}",
                    "изображение, на котором {shown} {A}", "простой рисунок: {A}", "{A} на холсте", "рисунок с {A_ins}",
                    "{A_one} на картинке"],
                   ["нарисуй {A_acc}", "на изображении {seen} {A}"]),
        "two": (["{A} и {B}", "{A} и {B} на картинке", "картинка: {A} и {B}", "{A} вместе с {B_ins}",
                 "рисунок с {A_ins} и {B_ins}", "здесь нарисованы {A} и {B}", "на картинке {A}, а также {B}",
                 "изображение, на котором изображены {A} и {B}"],
                ["нарисуй {A_acc} и {B_acc}", "на изображении видны {A} и {B}"]),
        "relation": (["{A} {rel_B}", "{A} находится {rel_B}", "картинка: {A} {rel_B}", "на картинке {A} {rel_B}",
                      "{A} {placed} {rel_B}", "{rel_B} находится {A}", "изображение, на котором {A} {rel_B}",
                      "рисунок: {A} {rel_B}", "{B} {inv_A}"],
                     ["нарисуй {A_acc} {rel_B}", "видно, что {A} {rel_B}"]),
        "count": (["{N}", "на картинке {N}", "здесь {drawn} {N}", "картинка: {N}", "ровно {N}", "{N} на холсте",
                   "изображение, на котором {shown} {N}", "рисунок: {N}", "{N_digit}"],
                  ["нарисуй {N}", "всего {N}"]),
    },
}


def slot_owner(slot: str) -> int:
    """Which object a template slot names: 0 (objects[0], or a count scene's group), 1, or -1 (relation words and
    Russian agreement words). Russian `rel_B` / `inv_A` hold the relation's preposition and the object after it."""
    if slot in ("rel", "inv", "pos") or slot in _RU_AGREE:
        return -1
    if slot.endswith(("_A", "_B")):
        return "AB".index(slot[-1])
    return 1 if slot[0] in "bB" else 0


_OPEN, _CLOSE = ("\ue000", "\ue001"), "\ue002"  # private-use marks around each object's slot while filling


def _fill(template: str, slots: dict) -> tuple[str, list[int]]:
    """Format `template`; also return, per character of the result, the object it names (slot_owner, -1 for the
    template's own words)."""
    marked = template.format(**{k: v if slot_owner(k) < 0 else _OPEN[slot_owner(k)] + v + _CLOSE
                                for k, v in slots.items()})
    text, owners, owner = [], [], -1
    for ch in marked:
        if ch in _OPEN or ch == _CLOSE:
            owner = _OPEN.index(ch) if ch in _OPEN else -1
        else:
            text.append(ch)
            owners.append(owner)
    return "".join(text), owners


def describe(scene: Scene, language: str, rng: np.random.Generator, sized: bool = True, split: str = "train",
             with_owners: bool = False):
    """Caption `scene` in `language`; sized: name every object's size class; split "eval" draws half of its
    captions from templates never used in training. with_owners: (text, owners), owners[i] the object character i
    names (0, 1; -1 for other words)."""
    train, held = _TEMPLATES[language][scene.kind]
    pool = train if split == "train" else (held if rng.random() < 0.5 else train)
    template = _pick(rng, pool)
    text, owners = _fill(template, _slots(language, scene, sized, rng))
    if scene.background != "default":
        words = _EN if language == "en" else _ZH if language == "zh" else None
        if words:
            text += _pick(rng, words["bg_t"]).format(_pick(rng, words["bg"][scene.background]))
        else:
            loc, nom = _RU_BG[scene.background]
            text += _pick(rng, (f" на {loc} фоне", f", {nom} фон", f", фон {nom}"))
    if language == "zh":
        text += "。" if rng.random() < 0.2 else ""
    else:
        if rng.random() < 0.35:
            text = text[0].upper() + text[1:]
        text += "." if rng.random() < 0.2 else ""
    owners += [-1] * (len(text) - len(owners))
    return (text, owners) if with_owners else text


SIZE_MENTION = 0.6  # share of captions that name each object's size class


def caption(scene: Scene, rng: np.random.Generator, language: str | None = None, languages=LANGUAGES,
            weights=None, split: str = "train", with_sized: bool = False, with_owners: bool = False):
    """(text, language): a random template, language (from `languages`/`weights` unless given) and size mention;
    with_sized adds whether the sizes were named: (text, language, sized); with_owners adds describe's owners."""
    if language is None:
        language = languages[int(rng.choice(len(languages), p=_normalise(weights, len(languages))))]
    sized = bool(rng.random() < SIZE_MENTION)
    text, owners = describe(scene, language, rng, sized=sized, split=split, with_owners=True)
    return (text, language) + ((sized,) if with_sized else ()) + ((owners,) if with_owners else ())


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _strings(v)


# filler material: letters of each alphabet; for Chinese, CJK ideographs no template or vocabulary word uses
_LETTERS = {"en": "abcdefghijklmnopqrstuvwxyz", "ru": "абвгдежзийклмнопрстуфхцчшщыьэюя"}
_ZH_USED = {ch for s in _strings((_ZH, _TEMPLATES["zh"])) for ch in s}
_ZH_WORDS = sorted({w for w in _strings(_ZH) if len(w) > 1 and "{" not in w})
_ZH_FILLER = np.array([c for c in range(0x4E00, 0x9FA6) if chr(c) not in _ZH_USED])
_KNOWN_WORDS = {w.lower() for s in _strings((_EN, _TEMPLATES["en"], _RU_NOUN, _RU_ADJ, _RU_NUM, _RU_REL, _RU_AGREE,
                                              _RU_BG, _TEMPLATES["ru"], tuple(COLORS))) for w in s.split()}


def filler_word(language: str, rng: np.random.Generator) -> str:
    """A made-up word: 2-9 random letters (en, ru) or 1-3 unused ideographs (zh); never a word captions use."""
    while True:
        if language == "zh":
            word = "".join(chr(int(c)) for c in rng.choice(_ZH_FILLER, int(rng.integers(1, 4))))
        else:
            letters = _LETTERS[language]
            word = "".join(letters[i] for i in rng.integers(len(letters), size=int(rng.integers(2, 10))))
        if word not in _KNOWN_WORDS:
            return word


def with_filler(text: str, language: str, rng: np.random.Generator, words: int | None = None) -> str:
    """`text` with 1-3 made-up words at random word boundaries (zh: between characters, never inside a vocabulary
    word). Pretraining the text encoder on such captions teaches it to read the content words and pass over the rest,
    which is what a template it never saw asks of it; what the caption states is unchanged."""
    if language == "zh":  # no spaces: any boundary that does not split a vocabulary word
        inside = {i for w in _ZH_WORDS for start in _occurrences(text, w) for i in range(start + 1, start + len(w))}
        cuts = [i for i in range(len(text) + 1) if i not in inside]
    else:
        cuts = [0] + [i + 1 for i, ch in enumerate(text) if ch == " "] + [len(text)]
    fillers = [(int(rng.choice(cuts)), filler_word(language, rng))
               for _ in range(int(rng.integers(1, 4)) if words is None else words)]
    for at, word in sorted(fillers, reverse=True):
        pad = "" if language == "zh" else " "
        text = (text[:at] + word + pad + text[at:]) if at < len(text) else text + pad + word
    return text.strip()


def _occurrences(text: str, word: str):
    start = text.find(word)
    while start >= 0:
        yield start
        start = text.find(word, start + 1)


# --- what a caption says, as class labels (targets for pretraining the text encoder) ------------------------------

PAIRS = [(c, s) for c in COLORS for s in SHAPES]  # every (colour, shape) the world can name
# (head, classes, heads of that kind): per pair its count 0-3 and named size (none/small/large); the relation of the
# lower-numbered pair to the other (none + RELATIONS); the background
LABEL_HEADS = (("count", 4, len(PAIRS)), ("size", 3, len(PAIRS)), ("relation", 1 + len(RELATIONS), 1),
               ("background", len(BACKGROUNDS), 1))


def caption_labels(scene: Scene, sized: bool) -> list[int]:
    """Everything a caption of `scene` states, independent of language, template and word order: one class index
    per head of LABEL_HEADS, in order."""
    count, size = [0] * len(PAIRS), [0] * len(PAIRS)
    for o in scene.objects:
        k = PAIRS.index((o.color, o.shape))
        count[k] += 1
        size[k] = 1 + list(SIZES).index(o.size) if sized else 0
    relation = 0
    if scene.relation:
        a, b = (PAIRS.index((o.color, o.shape)) for o in scene.objects[:2])
        rel = scene.relation if a < b else INVERSE[scene.relation]  # "A left of B" == "B right of A"
        relation = 1 + RELATIONS.index(rel)
    return count + size + [relation, list(BACKGROUNDS).index(scene.background)]


def _normalise(weights, n):
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    return w / w.sum()


# --- dataset ----------------------------------------------------------------------------------------------------

class ShapesDataset:
    """Infinite, index-addressable (image, caption) pairs; item i depends only on (seed, i), so training resumes
    at an exact data position. Images are PIL, or float tensors (3, H, W) in [-1, 1] with as_tensor=True."""

    def __init__(self, seed: int = 0, size: int = 256, languages=LANGUAGES, language_weights=None,
                 kind_weights=None, as_tensor: bool = False, length: int = 2 ** 31 - 1,
                 centre_jitter: float | None = None, gap: float = GAP):
        """`centre_jitter`: None places objects uniformly; a number centres each scene's group (`centre_group`).
        `gap`: the least distance between two objects' bboxes (canvas units)."""
        if centre_jitter is not None and not 0 <= centre_jitter <= 0.5:
            raise ValueError(f"centre_jitter must be between 0 and 0.5 (canvas units), got {centre_jitter!r}")
        if not isinstance(gap, (int, float)) or not 0 <= gap <= MAX_GAP:
            raise ValueError(f"gap must be between 0 and {MAX_GAP} (canvas units), got {gap!r}")
        self.seed, self.size, self.languages, self.centre_jitter = seed, size, tuple(languages), centre_jitter
        self.gap = float(gap)
        self.as_tensor, self.length = as_tensor, length
        self.language_weights = _normalise(language_weights, len(self.languages))
        self.kind_weights = _normalise(KIND_WEIGHTS if kind_weights is None else kind_weights, len(KINDS))

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        rng = np.random.default_rng([self.seed, index])     # training seeds: 2-word entropy; the benchmark uses 4+
        scene = sample_scene(rng, kind_weights=self.kind_weights, gap=self.gap)
        return (scene if self.centre_jitter is None else centre_group(scene, rng, self.centre_jitter)), rng

    def __getitem__(self, index: int):
        if index < 0:
            raise IndexError(index)
        scene, rng = self.scene(index)
        text, _ = caption(scene, rng, languages=self.languages, weights=self.language_weights)
        img = render(scene, self.size)
        return (to_tensor(img) if self.as_tensor else img), text

    def labels(self, index: int) -> np.ndarray:
        """Item `index`'s shape_labels at the dataset's size."""
        return shape_labels(self.scene(index)[0], self.size)

    def __iter__(self):
        for i in range(self.length):
            yield self[i]


def to_tensor(img: Image.Image):
    """PIL RGB -> float32 torch tensor (3, H, W) in [-1, 1]."""
    import torch
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
