"""Beyond the native size: windowed attention against a masked reference, RoPE scaling, their per-step /
per-block scheduling in the pipeline, and the hires fix."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chromaflow.cli import main
from chromaflow.models.step_cache import StepCache
from chromaflow.models.transformer import (RopeScaling, WindowedAttention, apply_rope, attention, build, image_ids,
                                           position_embedding, preset)
from chromaflow.pipeline.loading import random_pipeline


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny")


def masked_reference(q, k, v, pe, key_mask, n_txt, grid, size, shift):
    """Windowed attention as one full attention with a mask: image query i sees image key j only when both fall
    in the same window of the grid offset by `shift`; text queries and text keys are unrestricted."""
    rows, cols = grid
    r, c = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
    window = ((r + shift[0]) // size[0]) * cols + (c + shift[1]) // size[1]
    allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
    allowed[n_txt:, n_txt:] = window[:, None] == window[None, :]
    mask = allowed[None, None] & key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("grid, size, shift", [((4, 6), (2, 3), (0, 0)), ((5, 7), (2, 3), (1, 1)),
                                               ((5, 7), (3, 3), (1, 1)), ((6, 6), (4, 4), (2, 2))])
def test_windowed_attention_equals_full_attention_with_a_window_mask(grid, size, shift):
    torch.manual_seed(0)
    b, heads, d, n_txt = 2, 2, 32, 3
    length = n_txt + grid[0] * grid[1]
    q, k, v = (torch.randn(b, heads, length, d) for _ in range(3))
    ids = torch.cat([torch.zeros(b, n_txt, 3), image_ids(b, *grid)], 1)
    pe = position_embedding(ids, (4, 14, 14), 10_000)
    key_mask = torch.ones(b, length, dtype=torch.bool)
    key_mask[0, 2] = False  # a hidden text token
    out = attention(q, k, v, pe, key_mask, WindowedAttention(grid, size, shift=shift))
    torch.testing.assert_close(out, masked_reference(q, k, v, pe, key_mask, n_txt, grid, size, shift),
                               atol=1e-5, rtol=0)
    whole = attention(q, k, v, pe, key_mask, WindowedAttention(grid, (99, 99)))  # clamped to the grid
    torch.testing.assert_close(whole, attention(q, k, v, pe, key_mask), atol=1e-5, rtol=0)


def test_blocks_alternate_the_shift_and_only_the_first_ones_use_windows():
    w = WindowedAttention((8, 8), (4, 4), blocks=3)
    assert [None if w.at(i) is None else w.at(i).shift for i in range(4)] == [(0, 0), (2, 2), (0, 0), None]
    model = build("tiny").eval()
    assert [blk.index for blk in [*model.double_blocks, *model.single_blocks]] == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 36, 64, generator=g), image_ids(1, 6, 6), torch.randn(1, 5, 32, generator=g),
            torch.zeros(1, 5, 3), torch.tensor([0.6]))
    with torch.no_grad():
        plain = model(*args)
        assert torch.equal(model(*args, window=WindowedAttention((6, 6), (3, 3), blocks=0)), plain)
        windowed = model(*args, window=WindowedAttention((6, 6), (3, 3)))
        cached = model(*args, window=WindowedAttention((6, 6), (3, 3)), cache=StepCache("fbc", 0.0))
    assert (windowed - plain).abs().max() > 1e-3
    torch.testing.assert_close(cached, windowed, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not match 36 image tokens"):
        model(*args, window=WindowedAttention((5, 6), (3, 3)))


def test_rope_scaling_interpolates_or_stretches_the_slow_frequencies():
    axes, s = (4, 14, 14), 2.5
    p = torch.tensor([[[0.0, 3.0, 7.0], [0.0, 10.0, 1.0]]])
    native = position_embedding(p, axes, 10_000)
    far = p * torch.tensor([1.0, s, s])
    # interpolation: positions s times further out embed exactly like the native ones
    torch.testing.assert_close(position_embedding(far, axes, 10_000, RopeScaling("interpolate", s)), native)
    ntk = position_embedding(far, axes, 10_000, RopeScaling("ntk", s))
    plain_far = position_embedding(far, axes, 10_000)
    first = (4, 4 + 14)  # channel where each spatial axis starts (two channels per frequency)
    for start in first:
        fastest, slowest = slice(start, start + 2), slice(start + 12, start + 14)
        torch.testing.assert_close(ntk[..., fastest], plain_far[..., fastest])  # unchanged
        torch.testing.assert_close(ntk[..., slowest], native[..., slowest], atol=1e-5, rtol=0)
    torch.testing.assert_close(position_embedding(p, axes, 10_000, RopeScaling("ntk", 1.0)), native)
    with pytest.raises(ValueError, match="valid: interpolate, ntk"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match=">= 1"):
        RopeScaling("ntk", 0.5)


@pytest.mark.parametrize("rows, cols", [(4, 4), (8, 8), (6, 12)])
def test_position_grid_scales_image_positions_so_every_size_spans_the_same_range(rows, cols):
    """A position_grid model on a rows x cols grid equals the plain model fed positions scaled by
    grid / sqrt(rows * cols); at grid x grid tokens it is the plain model itself."""
    torch.manual_seed(0)
    plain = build(preset("tiny")).eval()
    gridded = build(preset("tiny", position_grid=4)).eval()
    gridded.load_state_dict(plain.state_dict())
    img, txt = torch.randn(2, rows * cols, 64), torch.randn(2, 5, 32)
    ids, txt_ids, t = image_ids(2, rows, cols), torch.zeros(2, 5, 3), torch.tensor([0.3, 0.8])
    scale = 4 / math.sqrt(rows * cols)
    with torch.no_grad():
        expected = plain(img, ids * torch.tensor([1.0, scale, scale]), txt, txt_ids, t)
        got = gridded(img, ids, txt, txt_ids, t)
        torch.testing.assert_close(got, expected)
        if rows * cols == 16:
            assert torch.equal(got, plain(img, ids, txt, txt_ids, t))
        else:
            assert not torch.allclose(got, plain(img, ids, txt, txt_ids, t), atol=1e-3)
    assert gridded.params.to_dict()["position_grid"] == 4
    with pytest.raises(ValueError, match="position_grid must be a positive"):
        preset("tiny", position_grid=0)


def test_rope_scaling_is_refused_by_name_for_a_model_whose_positions_scale_with_size():
    gridded = random_pipeline("tiny")
    gridded.transformer.params = preset("tiny", position_grid=4)
    with pytest.raises(ValueError, match="rope_scaling 'interpolate' does not apply.*position_grid 4"):
        gridded("a red circle", width=128, height=128, rope_scaling="interpolate", progress=False)


def window_calls(pipe, **kw):
    """pipe(...) -> (output, per transformer call: (its WindowedAttention or None, has rope scaling))."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs.get("window"), kwargs.get("rope_scaling"))), with_kwargs=True)
    try:
        return pipe("a red circle", seed=2, progress=False, **kw), seen
    finally:
        handle.remove()


def test_window_steps_and_blocks_fractions_and_rope_only_beyond_native(pipe):
    out, seen = window_calls(pipe, width=128, height=128, steps=6, attention_window=64, attention_window_steps=0.5,
                             attention_window_blocks=0.5, rope_scaling="ntk")
    assert [w is not None for w, _ in seen] == [True] * 3 + [False] * 3
    assert seen[0][0].grid == (8, 8) and seen[0][0].size == (4, 4) and seen[0][0].blocks == 2  # of 4 blocks
    assert all(r == RopeScaling("ntk", 2.0) for _, r in seen)  # 128 px on a 64 px model
    assert out.settings["attention_window"] == 64 and out.settings["rope_scaling"] == "ntk"
    with pytest.warns(UserWarning, match="full attention"):
        native, seen = window_calls(pipe, rope_scaling="interpolate", attention_window=64)
    assert all(w is None and r is None for w, r in seen) and "full attention" in native.settings["adjustments"][0]
    assert torch.equal(native.latents, pipe("a red circle", seed=2, progress=False).latents)


@pytest.mark.parametrize("kw, match", [
    (dict(attention_window=40), "multiple of 16"),
    (dict(attention_window=32, attention_window_steps=2), "fraction of the steps"),
    (dict(attention_window=32, attention_window_blocks=-1), "fraction of the blocks"),
    (dict(rope_scaling="linear"), "valid: interpolate, ntk")])
def test_bad_highres_options_name_the_value(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe("a", progress=False, **kw)


# --- hires fix ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("upscale", ["latent", "pixel"])
def test_hires_fix_generates_upscales_and_redenoises_from_the_strength(pipe, upscale):
    steps, hires_steps, strength = 4, 6, 0.5
    infos = []
    out = pipe("a red circle", seed=3, steps=steps, hires_scale=2, hires_upscale=upscale, hires_steps=hires_steps,
               hires_strength=strength, callback=infos.append, progress=False)
    second = math.ceil(strength * hires_steps)
    assert out.image.size == (128, 128) and out.settings["hires_size"] == [128, 128]
    assert [i.step for i in infos] == list(range(steps + second)) and {i.steps for i in infos} == {steps + second}
    assert infos[steps].latents.shape[-1] == 16 and infos[steps].t < 1  # the second pass starts part-way
    base = pipe("a red circle", seed=3, steps=steps, progress=False)
    assert torch.equal(infos[steps - 1].x0, base.latents)  # pass 1 is the plain generation
    assert out.settings["hires_shift"] > out.settings["shift"]  # the schedule is recomputed for the new size


def test_hires_size_is_rounded_and_bad_hires_options_are_refused(pipe):
    with pytest.warns(UserWarning, match="rounded to 80x80"):
        out = pipe("a", hires_scale=1.3, seed=0, progress=False)
    assert out.image.size == (80, 80)
    for kw, match in [(dict(hires_scale=0.5), ">= 1"), (dict(hires_scale=2, hires_upscale="esrgan"), "valid: latent"),
                      (dict(hires_scale=2, hires_strength=1.5), r"strength must be in \[0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            pipe("a", progress=False, **kw)


def test_cli_large_image_options(tmp_path, capsys):
    out = tmp_path / "big.png"
    assert main(["generate", "a red circle", "--model", "tiny", "--width", "128", "--height", "64", "--tile", "64",
                 "--attention-window", "32", "--rope-scaling", "interpolate", "--vae-tile", "64", "--quiet",
                 "-o", str(out)]) == 0
    assert Image.open(out).size == (128, 64)
    assert main(["generate", "a red circle", "--model", "tiny", "--hires-scale", "1.5", "--hires-upscale", "pixel",
                 "--quiet", "-o", str(out)]) == 0
    assert Image.open(out).size == (96, 96)
    with pytest.raises(SystemExit):
        main(["generate", "x", "--attention-window", "40"])
    assert "not a positive multiple of 16" in capsys.readouterr().err


def test_hires_benchmark_smoke(tmp_path, capsys):
    """benchmarks/hires.py end to end on the tiny model (CI's smoke; the real table runs on the built-in model)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "hires.py"
    spec = importlib.util.spec_from_file_location("hires_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path / "hires.json")])
    report = json.loads((tmp_path / "hires.json").read_text())
    assert {(r["mode"], r["pixels"]) for r in report["cost"]} >= {("MultiDiffusion", 4), ("windowed attention", 1)}
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in report["cost"])
    assert [r["mode"] for r in report["duplication"]][:2] == ["native", "plain"]
    assert "| hires fix (latent, 0.5) | 2x |" in capsys.readouterr().out
