"""Disk training data: kohya folders, JSONL manifests, aspect buckets, deterministic batches, the latent cache."""

import json
import math
import os
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from chromaflow.engine.data import bucket_resolutions, make_dataset
from chromaflow.models.vae import VAE, small_vae_config


def image(path, w, h, color=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def captioned(path, w, h, caption):
    image(path, w, h)
    path.with_suffix(".txt").write_text(caption + "\n")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    captioned(root / "square.png", 64, 64, "a square")
    captioned(root / "wide.jpg", 128, 64, "a wide one")
    captioned(root / "tall.webp", 48, 96, "a tall one")
    captioned(root / "3_concept" / "c1.png", 64, 64, "concept one")
    captioned(root / "3_concept" / "more" / "c2.png", 64, 64, "concept two")
    image(root / "nocap.png", 64, 64)
    (root / "broken.png").write_bytes(b"not an image at all")
    (root / "broken.txt").write_text("never seen")
    (root / "notes.md").write_text("ignored")
    return root


def load(spec, vae=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = make_dataset(spec, vae)
    return data, [str(w.message) for w in caught]


def test_folder_scan_captions_repeats_and_warnings(folder):
    data, messages = load({"kind": "folder", "path": str(folder)})
    assert sorted(it.path.name for it in data.items) == ["c1.png", "c2.png", "nocap.png", "square.png", "tall.webp",
                                                         "wide.jpg"]
    assert {it.path.name: it.repeats for it in data.items}["c2.png"] == 3  # nearest N_ folder above it
    assert {it.path.name: it.caption for it in data.items}["nocap.png"] == ""
    assert any("broken.png" in m for m in messages)
    assert sum("no .txt caption" in m for m in messages) == 1 and any(m.startswith("1 of 6") for m in messages)


def test_one_epoch_of_single_batches_sees_every_item_once_with_repeats(folder):
    data, _ = load({"kind": "folder", "path": str(folder), "seed": 3})
    n = data.epoch_length(1, 64)
    assert n == 4 + 2 * 3
    seen = Counter(c for k in range(n) for c in data.batch(k, 1, 64)[1])
    assert seen == Counter({"a square": 1, "a wide one": 1, "a tall one": 1, "": 1, "concept one": 3, "concept two": 3})


def test_batches_deterministic_by_number_and_disjoint_within_an_epoch(tmp_path):
    for i in range(10):
        captioned(tmp_path / f"{i}.png", 32 + 16 * (i % 2), 32, f"item {i}")
    spec = {"kind": "folder", "path": str(tmp_path), "buckets": False, "seed": 1}
    a, _ = load(spec)
    b, _ = load(spec)
    for number in (0, 3, 7, 12):
        (x1, c1), (x2, c2) = a.batch(number, 2, 32), b.batch(number, 2, 32)
        assert c1 == c2 and torch.equal(x1, x2)
        assert x1.shape == (2, 3, 32, 32) and x1.min() >= -1 and x1.max() <= 1
    epoch = [a.batch(k, 2, 32)[1] for k in range(5)]
    assert sorted(c for batch in epoch for c in batch) == sorted(f"item {i}" for i in range(10))
    assert [a.batch(k, 2, 32)[1] for k in range(5, 10)] != epoch  # the next epoch reshuffles
    other, _ = load({**spec, "seed": 2})
    assert [other.batch(k, 2, 32)[1] for k in range(5)] != epoch


@pytest.mark.parametrize("size", [64, 128, 256, 512, 1024])
def test_bucket_shapes(size):
    res = bucket_resolutions(size)
    assert (size, size) in res and len(res) >= 5
    for w, h in res:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.25 - 1e-9 <= w / h <= 4 + 1e-9
        assert abs(w * h / size**2 - 1) < (0.07 if size >= 256 else 0.1)
    assert {(h, w) for w, h in res} == set(res)  # symmetric: portrait and landscape alike
    assert max(w / h for w, h in bucket_resolutions(size, min_aspect=0.5, max_aspect=2.0)) <= 2.0


def test_aspect_assignment_and_centre_crop(folder, tmp_path):
    data, _ = load({"kind": "folder", "path": str(folder)})
    names = {it.path.name: i for i, it in enumerate(data.items)}
    res = bucket_resolutions(256)
    for name, ratio in [("wide.jpg", 2.0), ("tall.webp", 0.5), ("square.png", 1.0)]:
        w, h = data.bucket(names[name], 256)
        assert abs(math.log(w / h) - math.log(ratio)) == min(abs(math.log(a / b) - math.log(ratio)) for a, b in res)
    assert data.bucket(names["wide.jpg"], 256)[0] > data.bucket(names["wide.jpg"], 256)[1]
    for (w, h), _ in data.layout(256):  # the buckets actually used keep the area
        assert w * h == pytest.approx(256 * 256, rel=0.07)

    rotated = tmp_path / "exif" / "phone.jpg"  # stored 64x32, displayed 32x64 (EXIF orientation 6)
    rotated.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), (0, 0, 255)).save(rotated, exif=exif.tobytes())
    phone = load({"kind": "folder", "path": str(rotated.parent)})[0]
    w, h = phone.bucket(0, 64)
    assert h > w and phone.batch(0, 1, 64)[0].shape == (1, 3, h, w)

    stripes = np.zeros((40, 120, 3), np.uint8)
    stripes[:, :40], stripes[:, 40:80], stripes[:, 80:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    root = tmp_path / "stripes"
    root.mkdir()
    Image.fromarray(stripes).save(root / "s.png")
    x, _ = load({"kind": "folder", "path": str(root), "buckets": False})[0].batch(0, 1, 32)
    assert x.shape == (1, 3, 32, 32)
    assert x[0, 1].mean() > 0.9 and x[0, 0].mean() < -0.9  # the cover-resize crop keeps the green middle


def test_unreadable_image_mid_training_is_replaced_not_fatal(tmp_path):
    for i in range(3):
        captioned(tmp_path / f"{i}.png", 32, 32, f"item {i}")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "t.png")
    (tmp_path / "t.txt").write_text("truncated")
    raw = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])  # header reads fine, decoding fails
    data, _ = load({"kind": "folder", "path": str(tmp_path), "buckets": False})
    assert len(data) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = [c for k in range(data.epoch_length(4, 32)) for c in data.batch(k, 4, 32)[1]]
    assert "truncated" not in captions and len(captions) == 4
    assert any("t.png" in str(w.message) for w in caught)


def test_jsonl_manifest(tmp_path):
    captioned(tmp_path / "imgs" / "a.png", 64, 32, "unused sidecar")
    image(tmp_path / "elsewhere" / "b.png", 32, 64)
    manifest = tmp_path / "imgs" / "train.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "caption": "first"}) + "\n\n"
                        + json.dumps({"image": str(tmp_path / "elsewhere" / "b.png"), "text": "second"}) + "\n")
    data, _ = load({"kind": "jsonl", "path": str(manifest)})
    assert [it.caption for it in data.items] == ["first", "second"]
    assert data.bucket(0, 64)[0] > data.bucket(0, 64)[1]

    bad = [("{not json", "not valid JSON"), ("[1, 2]", "expected an object"), ('{"caption": "x"}', '"image"'),
           ('{"image": "a.png"}', '"caption"'), ('{"image": "missing.png", "caption": "x"}', "image not found")]
    for line, message in bad:
        manifest.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"train.jsonl:2: .*{message}"):
            make_dataset({"kind": "jsonl", "path": str(manifest)})


def test_spec_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no training images"):
        make_dataset({"kind": "folder", "path": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset({"kind": "folder", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="unknown data keys \\['colour'\\]; valid: .*cache_latents"):
        make_dataset({"kind": "folder", "path": str(tmp_path), "colour": 1})
    with pytest.raises(ValueError, match="unknown data kind"):
        make_dataset({"kind": "parquet", "path": str(tmp_path)})


def test_shuffle_captions_is_deterministic(tmp_path):
    captioned(tmp_path / "a.png", 32, 32, "one, two, three, four, five")
    data, _ = load({"kind": "folder", "path": str(tmp_path), "shuffle_captions": True})
    orders = [data.batch(k, 1, 32)[1][0] for k in range(6)]
    assert orders == [data.batch(k, 1, 32)[1][0] for k in range(6)] and len(set(orders)) > 1
    assert all(sorted(o.split(", ")) == sorted("one, two, three, four, five".split(", ")) for o in orders)


def test_latent_cache_written_once_and_reused(folder, tmp_path):
    torch.manual_seed(0)
    vae = VAE(small_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)).eval()
    encoded = []
    encode = vae.encode
    vae.encode = lambda images: (encoded.append(len(images)), encode(images))[1]
    spec = {"kind": "folder", "path": str(folder), "cache_latents": True, "cache_dir": str(tmp_path / "cache")}

    data, _ = load(spec, vae)
    assert data.returns_latents
    n = data.epoch_length(2, 32)
    first = [data.batch(k, 2, 32) for k in range(n)]
    x, captions = first[0]
    w, h = data.bucket(data.items.index(next(it for it in data.items if it.caption == captions[0])), 32)
    assert x.shape == (2, 16, h // 8, w // 8)
    assert sum(encoded) == len(data) == len(list((tmp_path / "cache").glob("*.safetensors")))
    images, _ = load({k: v for k, v in spec.items() if k != "cache_latents"})[0].batch(0, 2, 32)
    assert torch.allclose(vae.encode(images), x, atol=1e-5)  # the cache holds what vae.encode gives

    encoded.clear()
    again, _ = load(spec, vae)
    second = [again.batch(k, 2, 32) for k in range(n)]
    again.precompute(32, progress=False)
    assert sum(encoded) == 0
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second))

    square = next(it.path for it in data.items if it.path.name == "square.png")
    os.utime(square, ns=(square.stat().st_atime_ns, square.stat().st_mtime_ns + 10**9))  # an edited image
    load(spec, vae)[0].precompute(32, progress=False)
    assert sum(encoded) == 1
    assert not load({**spec, "cache_latents": False}, vae)[0].returns_latents
