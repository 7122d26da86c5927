"""Step caching (First Block Cache, TeaCache): exact when nothing is skipped, skips when inputs repeat."""

import pytest
import torch

from chromaflow.models.step_cache import StepCache
from chromaflow.models.transformer import build, image_ids


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build("tiny").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def inputs(model, batch=2, side=3, t=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    return (torch.randn(batch, side * side, p.in_channels, generator=g), image_ids(batch, side, side),
            torch.randn(batch, 5, p.context_in_dim, generator=g), torch.zeros(batch, 5, 3), torch.full((batch,), t))


@pytest.mark.parametrize("method", ["fbc", "teacache"])
def test_threshold_zero_never_skips_and_changes_nothing(model, method):
    cache = StepCache(method, threshold=0.0)
    with torch.no_grad():
        for seed in range(3):
            args = inputs(model, seed=seed)
            assert torch.allclose(model(*args, cache=cache), model(*args), atol=1e-6)
    assert cache.full_passes == cache.calls == 3


@pytest.mark.parametrize("method", ["fbc", "teacache"])
def test_a_repeated_input_reuses_the_residual(model, method):
    cache = StepCache(method, threshold=0.05)
    args = inputs(model)
    with torch.no_grad():
        full = model(*args, cache=cache)
        again = model(*args, cache=cache)
        other = model(*inputs(model, seed=5), cache=cache)  # a very different input: computed in full
    assert cache.stats() == {"method": method, "threshold": 0.05, "calls": 3, "full_passes": 2}
    assert torch.allclose(again, full, atol=1e-5)
    assert torch.allclose(other, model(*inputs(model, seed=5)), atol=1e-6)


def test_a_new_batch_shape_forces_a_full_pass(model):
    cache = StepCache("fbc", threshold=10.0)
    with torch.no_grad():
        model(*inputs(model, batch=2), cache=cache)
        model(*inputs(model, batch=1), cache=cache)
    assert cache.full_passes == 2


def test_max_skips_caps_reuses_in_a_row(model):
    cache = StepCache("fbc", threshold=10.0, max_skips=2)
    args = inputs(model)
    with torch.no_grad():
        for _ in range(7):
            model(*args, cache=cache)
    assert cache.full_passes == 3  # full, 2 reused, full, 2 reused, full


def test_bad_settings_name_the_valid_ones():
    with pytest.raises(ValueError, match="fbc, teacache"):
        StepCache("fast")
    with pytest.raises(ValueError, match="threshold"):
        StepCache("fbc", -1)
    with pytest.raises(ValueError, match="max_skips"):
        StepCache("fbc", 0.1, max_skips=0)


def test_pipeline_cache_option_reports_full_passes_and_threshold_zero_is_exact():
    from chromaflow.pipeline.loading import random_pipeline
    pipe = random_pipeline("tiny")
    settings = dict(width=64, height=64, steps=6, cfg=3.0, seed=1, progress=False)
    plain = pipe("a red circle", **settings)
    exact = pipe("a red circle", cache="fbc", cache_threshold=0.0, **settings)
    assert torch.equal(exact.latents, plain.latents) or torch.allclose(exact.latents, plain.latents, atol=1e-5)
    assert exact.settings["cache"]["full_passes"] == 6
    loose = pipe("a red circle", cache="teacache", cache_threshold=1e9, cache_start=0.0, **settings)
    assert loose.settings["cache"] == {"method": "teacache", "threshold": 1e9, "calls": 6, "full_passes": 1}
    # by default the first 20% of the steps (2 of 6) run in full
    guarded = pipe("a red circle", cache="teacache", cache_threshold=1e9, **settings)
    assert guarded.settings["cache"]["full_passes"] == 2
    # the first half of the steps run in full, every later one reuses
    late = pipe("a red circle", cache="teacache", cache_threshold=1e9, cache_start=0.5, **settings)
    assert late.settings["cache"]["full_passes"] == 3
    assert not torch.allclose(late.latents, plain.latents)
    with pytest.raises(ValueError, match="cache_start"):
        pipe("a red circle", cache="fbc", cache_start=1.5, **settings)
