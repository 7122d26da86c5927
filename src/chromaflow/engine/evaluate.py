"""GenEval-style compositional benchmark on the shapes world: held-out prompts, a classical detector, scoring, reports.

The detector needs no model: it estimates the background from the image border, unmixes every pixel as
background + alpha * (palette colour - background) (exact for anti-aliased renders, tolerant of blur), labels
foreground components, and classifies each component's shape by fitting the four ideal shapes with the measured
area and centroid (sub-pixel moments that blur preserves) and keeping the one with the smallest coverage error.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .shapes import (BACKGROUNDS, COLORS, GEOMETRY, LANGUAGES, SHAPES, SIZES, coverage, describe, place,
                     relation_holds, render, sample_scene)

COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
ALPHA_MIN = 0.5       # a pixel is foreground when more than half covered by a palette colour ...
RESIDUAL_MAX = 80.0   # ... and within this RGB distance of the background-to-colour line (rejects off-palette marks)
MIN_AREA = 0.0015     # components smaller than this fraction of the canvas are speckles (smallest object ~0.0045)
SMALL_MAX, LARGE_MIN = 0.24, 0.27   # longest side / canvas: small <= 0.24 < "medium" < 0.27 <= large
MAX_DETECTIONS = 10   # matching considers the largest components only
BLUR_SIGMAS = (0.0, 0.8, 1.6)   # ideal shapes are also compared blurred (px), for soft model outputs
RIM_PX = 3            # anti-aliased / blurred rim around a component that still counts as its coverage

CATEGORIES = {"single": "single", "two": "relation", "counting": "count"}   # benchmark category -> scene kind
METRICS = ("colour", "shape", "size", "count", "relation", "background", "all_correct")
_EVAL_SEED = 0x5EA1   # eval scenes use 4+-word seed entropy, training items 2 words: disjoint random streams


@dataclass
class Detection:
    color: str
    shape: str
    size: str                                   # small | medium | large
    centre: tuple[float, float]                 # bbox centre of the fitted shape, canvas units
    bbox: tuple[float, float, float, float]
    longest: float                              # longest bbox side / canvas side
    area: float                                 # covered fraction of the canvas
    fit_error: float                            # |coverage - ideal shape| / area, lower is cleaner


@dataclass(frozen=True)
class ObjSpec:
    shape: str
    color: str
    size: str | None = None                     # None: the prompt does not name a size


@dataclass
class PromptSpec:
    text: str
    language: str
    category: str                               # single | two | counting
    objects: tuple[ObjSpec, ...]                # counting: the same ObjSpec repeated `count` times
    relation: str | None = None                 # objects[0] <relation> objects[1]
    background: str | None = None               # named background, None when the prompt names none
    group: int = 0                              # shared by the language variants of one structured prompt
    reference: str = ""                         # the English version, for labels

    def to_dict(self) -> dict:
        return asdict(self)


# --- prompts ----------------------------------------------------------------------------------------------------

def benchmark_prompts(n_per_category: int = 50, seed: int = 0, languages=LANGUAGES) -> list[PromptSpec]:
    """n structured prompts per category (single / two with relation / counting), each written in every language.

    Scenes come from a seed space disjoint from ShapesDataset's, half the texts from held-out templates; half the
    prompts name sizes."""
    specs = []
    for ci, (category, kind) in enumerate(CATEGORIES.items()):
        for j in range(n_per_category):
            key = [_EVAL_SEED, seed, ci, j]
            rng = np.random.default_rng(key)
            scene = sample_scene(rng, kind)
            sized = bool(rng.random() < 0.5)
            text = {lang: describe(scene, lang, np.random.default_rng(key + [1 + LANGUAGES.index(lang)]), sized, "eval")
                    for lang in set(languages) | {"en"}}
            objects = tuple(ObjSpec(o.shape, o.color, o.size if sized else None) for o in scene.objects)
            bg = None if scene.background == "default" else scene.background
            specs += [PromptSpec(text[lang], lang, category, objects, scene.relation, bg, len(specs) // len(languages),
                                 text["en"]) for lang in languages]
    return specs


def spec_scene(spec: PromptSpec, rng: np.random.Generator):
    """A ground-truth Scene satisfying `spec`; unnamed sizes drawn at random (one draw for all counted objects)."""
    common = spec.objects[0].size or str(rng.choice(list(SIZES)))
    items = [(o.shape, o.color, o.size or (common if spec.category == "counting" else str(rng.choice(list(SIZES)))))
             for o in spec.objects]
    kind = "count" if spec.category == "counting" else "single" if len(items) == 1 else \
        "relation" if spec.relation else "two"
    return place(rng, items, spec.relation, spec.background or "default", kind)


# --- detection --------------------------------------------------------------------------------------------------

def background_rgb(a: np.ndarray) -> np.ndarray:
    """Median colour of the image's outer ring (float array (H, W, 3))."""
    w = max(1, min(a.shape[:2]) // 64)
    ring = [a[:w], a[-w:], a[:, :w], a[:, -w:]]
    return np.median(np.concatenate([r.reshape(-1, 3) for r in ring]), axis=0)


def detect_background(image: Image.Image) -> str:
    """Name of the BACKGROUNDS entry nearest to the image's border colour."""
    bg = background_rgb(np.asarray(image.convert("RGB"), dtype=np.float32))
    return min(BACKGROUNDS, key=lambda name: float(np.sum((np.array(BACKGROUNDS[name]) - bg) ** 2)))


def detect(image: Image.Image) -> list[Detection]:
    """Objects in `image`, largest first: colour by weighted majority, shape by ideal-shape fit, size, centre."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W = a.shape[:2]
    bg = background_rgb(a)
    p, d = a - bg, _PALETTE - bg
    # unmix p = alpha * d; alpha may overshoot 1 (a more saturated shade still belongs to its palette colour)
    alpha = np.clip(p @ d.T / np.maximum((d * d).sum(1), 1.0), 0.0, 1.5)                  # (H, W, K)
    resid = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)
    alpha = np.minimum(alpha, 1.0)
    best = resid.argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    fg = (best_alpha > ALPHA_MIN) & (np.take_along_axis(resid, best[..., None], -1)[..., 0] < RESIDUAL_MAX)
    labels, _ = ndimage.label(fg)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        own = labels[sl] == i
        if own.sum() < MIN_AREA * H * W:
            continue
        k = int(np.bincount(best[sl][own], weights=best_alpha[sl][own], minlength=len(COLOR_NAMES)).argmax())
        pad = 2 + max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) // 2     # room for a wider wrong template
        y0, x0 = max(0, sl[0].start - pad), max(0, sl[1].start - pad)
        win = np.s_[y0:min(H, sl[0].stop + pad), x0:min(W, sl[1].stop + pad)]
        own = labels[win] == i
        # the component plus its anti-aliased rim, never another component's pixels
        region = ndimage.binary_dilation(own, iterations=RIM_PX) & ((labels[win] == 0) | own) \
            & (resid[win][..., k] < RESIDUAL_MAX)
        out.append(_fit(np.where(region, alpha[win][..., k], 0.0), (x0, y0), (W, H), COLOR_NAMES[k]))
    return sorted(out, key=lambda det: -det.area)


def _fit(cov: np.ndarray, origin, canvas, color: str) -> Detection:
    """Classify a coverage map by the ideal shape (same area and centroid) that reproduces it best."""
    area = float(cov.sum())
    ys, xs = np.indices(cov.shape)
    cx, cy = float((cov * (xs + 0.5)).sum() / area), float((cov * (ys + 0.5)).sum() / area)
    fits = []
    for shape in SHAPES:
        aspect, fill, depth = GEOMETRY[shape]
        side = math.sqrt(area / (fill * aspect))
        top = cy - depth * aspect * side
        box = (cx - side / 2, top, cx + side / 2, top + aspect * side)
        ideal = coverage(shape, box, cov.shape)
        err = min(float(np.abs(cov - (ndimage.gaussian_filter(ideal, sigma) if sigma else ideal)).sum())
                  for sigma in BLUR_SIGMAS)
        fits.append((err / area, shape, side, box))
    err, shape, side, box = min(fits)
    (W, H), (ox, oy) = canvas, origin
    bbox = ((box[0] + ox) / W, (box[1] + oy) / H, (box[2] + ox) / W, (box[3] + oy) / H)
    longest = side / W
    size = "small" if longest <= SMALL_MAX else "large" if longest >= LARGE_MIN else "medium"
    return Detection(color, shape, size, ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2), bbox, longest,
                     area / (W * H), err)


# --- scoring ----------------------------------------------------------------------------------------------------

def score(spec: PromptSpec, detections: list[Detection], background: str | None = None) -> dict[str, bool]:
    """GenEval-style booleans. Spec objects are matched one-to-one to detections (most matching attributes, then
    largest); colour/shape/size judge the matched ones, count requires exactly the asked number of detections of
    each (colour, shape), relation compares the two matched centres; background is checked when both the prompt
    names one and `background` (the detected name) is given. Unmatched objects fail through `count`."""
    dets = detections[:MAX_DETECTIONS]

    def value(idx):
        pairs = [(o, dets[j]) for o, j in zip(spec.objects, idx) if j is not None]
        return (sum(2 * (d.color == o.color) + 2 * (d.shape == o.shape) + (o.size in (None, d.size)) for o, d in pairs),
                sum(d.area for _, d in pairs))

    # every one-to-one assignment (None: unmatched), in a deterministic order so ties resolve the same way
    n = len(spec.objects)
    options = dict.fromkeys(itertools.permutations(list(range(len(dets))) + [None] * n, n))
    best = max(options, key=value)
    pairs = [(o, dets[j]) for o, j in zip(spec.objects, best) if j is not None]
    wanted = Counter((o.color, o.shape) for o in spec.objects)
    result = {
        "colour": bool(pairs) and all(det.color == o.color for o, det in pairs),
        "shape": bool(pairs) and all(det.shape == o.shape for o, det in pairs),
        "size": bool(pairs) and all(o.size in (None, det.size) for o, det in pairs),
        "count": all(sum((det.color, det.shape) == key for det in dets) == n for key, n in wanted.items()),
        "relation": spec.relation is None or (
            None not in best[:2] and relation_holds(spec.relation, dets[best[0]].centre, dets[best[1]].centre)),
        "background": spec.background is None or background is None or background == spec.background,
    }
    result["all_correct"] = all(result.values())
    return result


def _applies(spec: PromptSpec, metric: str) -> bool:
    return {"size": any(o.size for o in spec.objects), "relation": spec.relation is not None,
            "background": spec.background is not None}.get(metric, True)


# --- running and reporting --------------------------------------------------------------------------------------

def evaluate_images(images: list[Image.Image], prompts: list[PromptSpec]) -> dict:
    """Score one image per prompt; accuracies per metric over the prompts where the metric applies, and the objects
    found per object asked for (1.0 is right on average; above 1, extra or broken-up objects)."""
    rows = []
    for spec, image in zip(prompts, images, strict=True):
        found = detect(image)
        rows.append(dict(text=spec.text, language=spec.language, category=spec.category, group=spec.group,
                         **score(spec, found, detect_background(image)), objects=len(found)))

    def summary(subset):
        out = {"n": len(subset)}
        for m in METRICS:
            vals = [r[m] for s, r in subset if _applies(s, m)]
            out[m] = sum(vals) / len(vals) if vals else None
        out["objects_per_asked"] = sum(r["objects"] / len(s.objects) for s, r in subset) / max(1, len(subset))
        return out

    both = list(zip(prompts, rows))
    return {"n": len(rows), "metrics": list(METRICS), "overall": summary(both),
            "by_category": {c: summary([x for x in both if x[0].category == c]) for c in CATEGORIES
                            if any(x[0].category == c for x in both)},
            "by_language": {lang: summary([x for x in both if x[0].language == lang]) for lang in LANGUAGES
                            if any(x[0].language == lang for x in both)},
            "per_prompt": rows}


def evaluate(generate_fn, prompts: list[PromptSpec], batch_size: int = 16, grid_path: str | None = None,
             progress: bool = False) -> dict:
    """Run generate_fn(list[str]) -> list[PIL.Image] over the prompts in batches and score every image."""
    from tqdm.auto import tqdm
    images = []
    with tqdm(total=len(prompts), desc="eval", unit="image", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            images += list(generate_fn([s.text for s in prompts[i:i + batch_size]]))
            bar.update(len(images) - bar.n)
    return _finish(images, prompts, grid_path)


def evaluate_ground_truth(prompts: list[PromptSpec], size: int = 64, seed: int = 0,
                          grid_path: str | None = None) -> dict:
    """Score exact renders of each spec: the detector's and scorer's ceiling (should be ~100%)."""
    images = [render(spec_scene(s, np.random.default_rng([_EVAL_SEED, seed, i, 7])), size)
              for i, s in enumerate(prompts)]
    return _finish(images, prompts, grid_path)


def _finish(images, prompts, grid_path):
    if grid_path:                               # 24 prompts spread over all categories and languages
        pick = sorted(set(np.linspace(0, len(images) - 1, min(len(images), 24)).round().astype(int).tolist()))
        sample_grid([images[i] for i in pick], [f"#{i} {prompts[i].language}: {prompts[i].reference}" for i in pick],
                    grid_path)
    return evaluate_images(images, prompts)


def markdown_table(report: dict) -> str:
    """Accuracy (%) per split (overall, categories, languages) x metric, "-" where a metric does not apply; then the
    objects found per object asked for."""
    rows = [("overall", report["overall"])] + list(report["by_category"].items()) + list(report["by_language"].items())
    lines = ["| split | n | " + " | ".join(METRICS) + " | objects / asked |",
             "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for name, r in rows:
        cells = ["-" if r[m] is None else f"{100 * r[m]:.1f}" for m in METRICS]
        objects = f"{r['objects_per_asked']:.2f}" if "objects_per_asked" in r else "-"  # older reports lack it
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + f" | {objects} |")
    return "\n".join(lines)


def sample_grid(images: list[Image.Image], captions: list[str], path: str, cols: int = 4,
                label_px: int = 30) -> Image.Image:
    """Tile images (resized to the first one's size) with short labels under each; writes a PNG to `path`.

    PIL's default font lacks CJK/Cyrillic glyphs: pass English captions or indices (non-ASCII becomes "?")."""
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * (h + label_px)), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, (img, text) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * (h + label_px)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
        text = text.encode("ascii", "replace").decode()
        lines, line = [], ""
        for word in text.split():
            if line and draw.textlength(line + " " + word, font=font) > w - 4:
                lines.append(line)
                line = word
            else:
                line = (line + " " + word).strip()
        for k, ln in enumerate((lines + [line])[:max(1, label_px // 12)]):
            draw.text((x + 2, y + h + 1 + 12 * k), ln, fill=(0, 0, 0), font=font)
    grid.save(path)
    return grid
