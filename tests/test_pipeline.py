"""The text-to-image pipeline on the tiny random model: reproducibility, batching, CFG, callbacks, caching."""

import numpy as np
import pytest
import torch

import chromaflow
from chromaflow.pipeline.loading import random_pipeline


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny")


def pixels(image):
    return torch.from_numpy(np.asarray(image).copy())


def test_same_seed_same_image_and_batch_rows_equal_single_images(pipe):
    a = pipe("a red circle", seed=7, batch_size=3, progress=False)
    b = pipe("a red circle", seed=7, batch_size=3, progress=False)
    assert all(pixels(x).equal(pixels(y)) for x, y in zip(a.images, b.images))
    alone = pipe("a red circle", seed=8, progress=False)  # image 1 of the batch uses seed 7 + 1
    assert pixels(alone.image).equal(pixels(a.images[1]))
    assert not pixels(a.images[0]).equal(pixels(a.images[1]))


def test_settings_are_reported_with_defaults_resolved(pipe):
    out = pipe("x", seed=1, progress=False)
    s = out.settings
    assert (s["width"], s["height"], s["steps"], s["sampler"], s["scheduler"]) == (64, 64, 4, "euler", "simple")
    assert s["seed"] == 1 and s["shift"] > 0 and out.image.size == (64, 64)
    assert out.latents.shape == (1, 16, 8, 8)


def count_forward_batches(pipe, **kw):
    batches = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        pipe("a prompt", seed=0, progress=False, **kw)
    finally:
        handle.remove()
    return batches


def test_cfg_batches_cond_and_uncond_and_cfg_one_skips_uncond(pipe):
    assert count_forward_batches(pipe, cfg=3.0, steps=3, batch_size=2) == [4, 4, 4]
    assert count_forward_batches(pipe, cfg=1.0, steps=3, batch_size=2) == [2, 2, 2]


def test_negative_prompt_changes_the_image(pipe):
    a = pipe("a red circle", negative_prompt="", cfg=4.0, seed=3, progress=False)
    b = pipe("a red circle", negative_prompt="blue", cfg=4.0, seed=3, progress=False)
    assert not pixels(a.image).equal(pixels(b.image))


def test_each_distinct_prompt_is_encoded_once_per_call(pipe, monkeypatch):
    seen = []
    original = pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda prompts: seen.append(list(prompts)) or original(prompts))
    pipe("cat", negative_prompt="dog", batch_size=3, cfg=2.0, seed=0, progress=False)
    assert seen == [["cat", "dog"]]


def test_a_full_text_cache_keeps_the_prompts_of_the_current_call(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "text_cache_size", 2)
    pipe.text_cache.clear()
    pipe.encode_prompts([""])  # the oldest entry, as the negative prompt of every benchmark batch is
    rows = pipe.encode_prompts(["a", "b", ""])  # three prompts, cache of two: none may be evicted before use
    assert rows.embeds.shape[0] == 3
    assert list(pipe.text_cache) == ["a", "b", ""]  # kept while in use; least recently used first
    pipe.encode_prompts(["c"])
    assert list(pipe.text_cache) == ["", "c"]


def test_callback_previews_and_can_interrupt(pipe):
    steps_seen = []

    def callback(info):
        steps_seen.append((info.step, info.latents.shape, info.x0.shape))
        return info.step < 1  # stop after the second step

    out = pipe("a", steps=6, seed=0, callback=callback, progress=False)
    assert [s for s, _, _ in steps_seen] == [0, 1]
    assert steps_seen[0][1] == steps_seen[0][2] == (1, 16, 8, 8)
    assert out.settings["interrupted"] is True and out.image.size == (64, 64)


@pytest.mark.parametrize("kw, match", [(dict(width=100), "multiple of 16"), (dict(steps=0), "steps"),
                                       (dict(sampler="nope"), "valid: euler"), (dict(batch_size=0), "batch")])
def test_bad_settings_name_the_value(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe("a", progress=False, **kw)


def test_load_by_name_and_missing_path():
    assert chromaflow.load("tiny").defaults.width == 64
    with pytest.raises(FileNotFoundError, match="no such file"):
        chromaflow.load("/nonexistent/model.safetensors")


def test_model_folder_round_trip_gives_identical_images(pipe, tmp_path):
    from chromaflow.pipeline.loading import save_folder
    save_folder(pipe, tmp_path / "m")
    loaded = chromaflow.load(tmp_path / "m")
    assert loaded.defaults == pipe.defaults and loaded.name == pipe.name and len(loaded.model_hash) == 10
    a, b = pipe("a red star", seed=2, progress=False), loaded("a red star", seed=2, progress=False)
    assert pixels(a.image).equal(pixels(b.image))


def test_diffusers_pipeline_folder_with_t5_loads_and_generates(pipe, tmp_path):
    """The layout of a ChromaPipeline repo: transformer/ text_encoder/ tokenizer/ vae/ + model_index.json."""
    import json
    from helpers import make_tiny_t5
    from chromaflow.formats.layouts import save_transformer
    from chromaflow.models.text import T5TextEncoder
    from chromaflow.pipeline.pipeline import Pipeline

    root = tmp_path / "chroma-diffusers"
    save_transformer(pipe.transformer, root / "transformer", layout="diffusers")
    make_tiny_t5(root / "text_encoder", root / "tokenizer")
    pipe.vae.save(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ChromaPipeline"}))
    loaded = chromaflow.load(root)
    assert isinstance(loaded.text_encoder, T5TextEncoder) and loaded.text_encoder.max_length == 512
    direct = Pipeline(pipe.transformer, T5TextEncoder(root / "text_encoder", root / "tokenizer"), pipe.vae,
                      defaults=pipe.defaults)
    assert loaded.defaults.width == 1024  # a real Chroma's native size when nothing else is said
    kw = dict(seed=4, cfg=3.0, width=64, height=64, steps=3, progress=False)
    a, b = loaded("a red circle above the big square", **kw), direct("a red circle above the big square", **kw)
    assert a.image.size == (64, 64) and pixels(a.image).equal(pixels(b.image))


def test_a_flux_transformer_is_refused_with_a_reason(pipe):
    from chromaflow.models.transformer import build
    from chromaflow.pipeline.pipeline import Pipeline
    with pytest.raises(ValueError, match="CLIP"):
        Pipeline(build("tiny-flux"), pipe.text_encoder, pipe.vae)



def test_compiled_blocks_give_the_eager_image(pipe):
    compiled = random_pipeline("tiny").compile()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), compiled.transformer.parameters()))
    for size, prompt in ((64, "a red circle"), (96, "two blue squares on a gray background")):  # new shapes
        eager = pixels(pipe(prompt, width=size, height=size, steps=2, seed=3, progress=False).image)
        fast = pixels(compiled(prompt, width=size, height=size, steps=2, seed=3, progress=False).image)
        assert (eager.float() - fast.float()).abs().mean() < 1.0  # of 255: fused kernels round differently
