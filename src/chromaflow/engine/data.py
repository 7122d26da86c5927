"""Training data from disk: kohya-style image folders and JSONL manifests in aspect-ratio buckets, with a latent cache.

Sources
- `folder`: images (png/jpg/jpeg/webp, recursive; dot-folders skipped) with a sidecar caption `NAME.txt`
  (`caption_extension`); a missing caption is "" (one warning with the count). The nearest enclosing folder named
  `N_concept` repeats the images under it N times (kohya).
- `jsonl`: one object per line, `{"image": path relative to the manifest's folder or absolute, "caption" | "text"}`.
An unreadable image is skipped with a warning naming it, found either when its header is read at start-up or when it
fails to decode later (then the batch takes the next image of the same bucket), so a bad file never stops a run.

Buckets: for a nominal size S the resolutions (w, h) are multiples of `bucket_step` (16 * round(S / 256), at least 16)
with w * h ~ S^2 and aspect w/h within [min_aspect, max_aspect] (1:4 .. 4:1). An image goes to the bucket nearest its
aspect ratio in |log(w/h) - log(W/H)|, is resized to cover the bucket and centre-cropped. `buckets: false`: one SxS.

Sampling: `batch(number, batch_size, size)` is a pure function of (seed, number, batch_size, size). For one
(size, batch_size), numbers run in epochs of L = sum_b ceil(n_b / batch_size) batches (n_b: items in bucket b, repeats
included). Epoch e shuffles each bucket's items (generator seeded by seed, size, batch_size, e), cuts them into
batches (the last one filled by wrapping round the shuffled order: small buckets repeat items) and shuffles the list of
all batches. So buckets are drawn in proportion to their item counts, the batches of an epoch are disjoint (up to that
wrap), DDP ranks (different numbers) see different images, and a resumed run replays the same batches.

Latent cache: with `cache_latents: true` and a VAE given to `make_dataset`, each item is encoded once per bucket
resolution (on first use, or up front with `precompute(size)`) into `cache_dir/<key>.safetensors`, the key hashing the
file's path, mtime and size, the bucket and the VAE's config and weights. Then `returns_latents` is True and `batch`
returns (latents (B, C, h, w) as `vae.encode` gives them, normalised; captions) instead of images.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import Tensor

from ..formats.checkpoint import save_checkpoint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SPEC_DEFAULTS = {"kind": "folder", "path": None, "seed": 0, "buckets": True, "bucket_step": None, "min_aspect": 0.25,
                 "max_aspect": 4.0, "cache_latents": False, "cache_dir": None, "caption_extension": ".txt",
                 "shuffle_captions": False}
REPEAT_FOLDER = re.compile(r"^(\d+)_.+")
CACHE_VERSION = "chromaflow-latents-1"  # bump when resizing/cropping changes, so old entries are not reused


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    width: int  # as displayed (EXIF orientation applied)
    height: int
    repeats: int = 1


def make_dataset(spec: dict, vae=None) -> "ImageDataset":
    """Build the dataset a training config's `data` section describes (see the module docstring for the keys)."""
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown data keys {unknown}; valid: {', '.join(sorted(SPEC_DEFAULTS))}")
    s = {**SPEC_DEFAULTS, **spec}
    if not s["path"]:
        raise ValueError(f"data kind {s['kind']!r} needs `path`")
    path = Path(s["path"]).expanduser()
    if s["kind"] == "folder":
        items, root = scan_folder(path, s["caption_extension"]), path
    elif s["kind"] == "jsonl":
        items, root = read_manifest(path), path.parent
    else:
        raise ValueError(f"unknown data kind {s['kind']!r}; valid: shapes, folder, jsonl")
    if s["cache_latents"] and vae is None:
        warnings.warn("data.cache_latents is set but no VAE was given to make_dataset: batches hold images")
    cache = None
    if s["cache_latents"]:
        cache = Path(s["cache_dir"]).expanduser() if s["cache_dir"] else root / ".latent-cache"
    return ImageDataset(items, seed=s["seed"], buckets=s["buckets"], bucket_step=s["bucket_step"],
                        min_aspect=s["min_aspect"], max_aspect=s["max_aspect"], shuffle_captions=s["shuffle_captions"],
                        vae=vae if cache else None, cache_dir=cache)


# --- sources --------------------------------------------------------------------------------------------------

def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed, from the header only; None (with a warning naming the file) if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # EXIF only when the header already carried it: PIL's getexif() decodes a whole PNG to look for it
            orientation = im.getexif().get(0x0112, 1) if "exif" in im.info else 1
            return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # rotated by 90 degrees
    except Exception as e:  # PIL raises many kinds for broken files
        warnings.warn(f"skipping unreadable image {path}: {e}")
        return None


def scan_folder(folder: Path, caption_extension: str = ".txt") -> list[Item]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    items, uncaptioned, found = [], 0, 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        hidden = any(p.startswith(".") for p in rel.parts)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or hidden or not path.is_file():
            continue
        found += 1
        repeats = next((int(m[1]) for p in reversed(rel.parts[:-1]) if (m := REPEAT_FOLDER.match(p))), 1)
        size = image_size(path)
        if size is None or repeats == 0:
            continue
        caption_file = path.with_suffix(ext)
        if caption_file.is_file():
            caption = " ".join(caption_file.read_text(encoding="utf-8", errors="replace").split())
        else:
            caption, uncaptioned = "", uncaptioned + 1
        items.append(Item(path, caption, *size, repeats))
    if uncaptioned:
        warnings.warn(f"{uncaptioned} of {len(items)} images in {folder} have no {ext} caption; they train with \"\"")
    if not items:
        kinds = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise ValueError(f"{folder}: no usable training images ({found} {kinds} files found recursively, "
                         "none readable with repeats > 0)" if found else
                         f"{folder}: no training images found (searched recursively for {kinds})")
    return items


def read_manifest(manifest: Path) -> list[Item]:
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"JSONL manifest not found: {manifest}")
    items = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object like {{\"image\": ..., \"caption\": ...}}")
        image, caption = row.get("image"), row.get("caption", row.get("text"))
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: needs \"image\": a path (string)")
        if not isinstance(caption, str):
            raise ValueError(f"{where}: needs \"caption\" (or \"text\"): a string")
        path = Path(image).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        if not path.is_file():
            raise ValueError(f"{where}: image not found: {path}")
        if (size := image_size(path)) is not None:
            items.append(Item(path, caption.strip(), *size))
    if not items:
        raise ValueError(f"{manifest}: lists no usable images")
    return items


# --- buckets and images ---------------------------------------------------------------------------------------

def bucket_resolutions(size: int, step: int | None = None, min_aspect: float = 0.25,
                       max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(w, h) pairs, multiples of `step`, with w * h ~ size^2 and min_aspect <= w/h <= max_aspect; sorted by w/h."""
    step = step or 16 * max(1, round(size / 256))
    if step % 16:
        raise ValueError(f"bucket_step {step} must be a multiple of 16")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise ValueError(f"need 0 < min_aspect <= 1 <= max_aspect, got {min_aspect}, {max_aspect}")
    found = set()
    for short in range(step, 2 * size, step):
        long = round(size * size / short / step) * step  # the long side that keeps the area nearest size^2
        if long < short:
            break
        if long / short <= max_aspect + 1e-9:
            found.add((long, short))
        if short / long >= min_aspect - 1e-9:
            found.add((short, long))
    if not found:
        raise ValueError(f"no buckets for size {size} with step {step} and aspects {min_aspect}..{max_aspect}")
    return sorted(found, key=lambda r: r[0] / r[1])


def load_image(path: Path, resolution: tuple[int, int]) -> Tensor:
    """The image as (3, h, w) in [-1, 1]: resized to cover `resolution` (w, h), centre-cropped; alpha over white."""
    w, h = resolution
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        sw, sh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((sw, sh), Image.Resampling.LANCZOS, reducing_gap=3.0)
        left, top = (sw - w) // 2, (sh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        pixels = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's config and weights: a cache entry is reused only by the VAE that wrote it."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    config = getattr(getattr(vae, "ae", None), "config", None)
    h.update((config.to_json_string() if config is not None else "").encode())
    for name, t in vae.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --- the dataset ----------------------------------------------------------------------------------------------

class ImageDataset:
    """Items in aspect buckets; `batch(number, batch_size, size)` -> (images in [-1, 1] (or latents), captions)."""

    def __init__(self, items: list[Item], seed: int = 0, buckets: bool = True, bucket_step: int | None = None,
                 min_aspect: float = 0.25, max_aspect: float = 4.0, shuffle_captions: bool = False, vae=None,
                 cache_dir: str | Path | None = None):
        self.items, self.seed, self.buckets, self.bucket_step = items, int(seed), bool(buckets), bucket_step
        self.min_aspect, self.max_aspect, self.shuffle_captions = min_aspect, max_aspect, shuffle_captions
        self.vae, self.cache_dir = vae, Path(cache_dir) if cache_dir else None
        self.returns_latents = vae is not None and self.cache_dir is not None
        self._vae_id = vae_fingerprint(vae) if self.returns_latents else ""
        self._expanded = np.repeat(np.arange(len(items)), [it.repeats for it in items])  # repeats as duplicates
        self._layouts: dict[int, list[tuple[tuple[int, int], np.ndarray]]] = {}
        self._plan_key, self._plan = None, []
        self._bad: set[int] = set()
        bucket_resolutions(256, bucket_step, min_aspect, max_aspect)  # validate the settings now, not mid-run

    def __len__(self) -> int:
        return len(self.items)

    def layout(self, size: int) -> list[tuple[tuple[int, int], np.ndarray]]:
        """The non-empty buckets at `size`: [((w, h), item indices with repeats), ...]."""
        if size not in self._layouts:
            if self.buckets:
                res = bucket_resolutions(size, self.bucket_step, self.min_aspect, self.max_aspect)
            else:
                res = [(max(16, 16 * round(size / 16)),) * 2]
            logs = np.log([w / h for w, h in res])
            aspect = np.log([it.width / it.height for it in self.items])
            nearest = np.abs(aspect[:, None] - logs[None, :]).argmin(1)[self._expanded]
            self._layouts[size] = [(res[b], self._expanded[nearest == b]) for b in np.unique(nearest).tolist()]
        return self._layouts[size]

    def bucket(self, index: int, size: int) -> tuple[int, int]:
        """The (w, h) bucket of item `index` at `size`."""
        return next(res for res, members in self.layout(size) if index in members)

    def epoch_length(self, batch_size: int, size: int) -> int:
        return sum(-(-len(members) // batch_size) for _, members in self.layout(size))

    def _epoch(self, size: int, batch_size: int, epoch: int) -> list[tuple[int, np.ndarray]]:
        key = (size, batch_size, epoch)
        if self._plan_key != key:
            rng = np.random.default_rng([self.seed, size, batch_size, epoch])
            batches = []
            for b, (_, members) in enumerate(self.layout(size)):
                order = members[rng.permutation(len(members))]
                n = -(-len(order) // batch_size)
                batches += [(b, row) for row in np.resize(order, n * batch_size).reshape(n, batch_size)]
            self._plan_key, self._plan = key, [batches[i] for i in rng.permutation(len(batches))]
        return self._plan

    def batch(self, number: int, batch_size: int, size: int) -> tuple[Tensor, list[str]]:
        if batch_size < 1 or number < 0:
            raise ValueError(f"need batch_size >= 1 and number >= 0, got {batch_size}, {number}")
        epoch, position = divmod(number, self.epoch_length(batch_size, size))
        b, members = self._epoch(size, batch_size, epoch)[position]
        resolution, pool = self.layout(size)[b]
        out, captions = [], []
        for k, index in enumerate(members.tolist()):
            x, index = self._fetch(index, pool, resolution)
            out.append(x)
            captions.append(self._caption(index, number, k))
        return torch.stack(out), captions

    def precompute(self, size: int, progress: bool = True) -> None:
        """Encode every item not yet cached for `size` (each into its bucket) now rather than on first use."""
        if not self.returns_latents:
            raise ValueError("precompute needs cache_latents and a VAE")
        from tqdm.auto import tqdm
        for resolution, members in self.layout(size):
            for index in tqdm(np.unique(members).tolist(), disable=not progress, desc=f"latents {resolution}"):
                if index not in self._bad:
                    self._latent(index, resolution)

    # --- items

    def _fetch(self, index: int, pool: np.ndarray, resolution: tuple[int, int]) -> tuple[Tensor, int]:
        """The item's tensor, or if it will not load, that of the next loadable item of its bucket (deterministic)."""
        start = int(np.flatnonzero(pool == index)[0])
        for j in range(len(pool)):
            i = int(pool[(start + j) % len(pool)])
            if i not in self._bad:
                x = self._latent(i, resolution) if self.returns_latents else self._image(i, resolution)
                if x is not None:
                    return x, i
        raise RuntimeError(f"no image of the {resolution[0]}x{resolution[1]} bucket can be loaded")

    def _image(self, index: int, resolution: tuple[int, int]) -> Tensor | None:
        try:
            return load_image(self.items[index].path, resolution)
        except Exception as e:  # a file that broke (or vanished) after the scan must not stop training
            warnings.warn(f"skipping unreadable image {self.items[index].path}: {e}")
            self._bad.add(index)
            return None

    def _latent(self, index: int, resolution: tuple[int, int]) -> Tensor | None:
        path = self.items[index].path
        try:
            st = path.stat()
        except OSError as e:
            warnings.warn(f"skipping unreadable image {path}: {e}")
            self._bad.add(index)
            return None
        key = f"{CACHE_VERSION}|{path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{resolution}|{self._vae_id}"
        file = self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
        if file.is_file():
            try:
                return load_file(file)["latents"]
            except Exception:
                pass  # a damaged entry is encoded again
        image = self._image(index, resolution)
        if image is None:
            return None
        with torch.no_grad():
            latents = self.vae.encode(image[None])[0].cpu().contiguous()
        save_checkpoint({"latents": latents}, file, metadata={"image": str(path), "bucket": "%dx%d" % resolution})
        return latents

    def _caption(self, index: int, number: int, k: int) -> str:
        caption = self.items[index].caption
        if self.shuffle_captions and "," in caption:  # kohya's shuffle_caption: comma-separated tags, reordered
            tags = [t.strip() for t in caption.split(",")]
            order = np.random.default_rng([self.seed, number, k]).permutation(len(tags))
            caption = ", ".join(tags[i] for i in order)
        return caption
