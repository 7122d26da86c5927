"""MultiDiffusion against its rule written out, region prompts, and the tiled VAE (seams, memory per tile)."""

import numpy as np
import pytest
import torch

from chromaflow.engine import sampling
from chromaflow.engine.shapes import render, sample_scene
from chromaflow.models.transformer import image_ids
from chromaflow.models.vae import VAE, pack, unpack
from chromaflow.pipeline.loading import BUILTIN_DIR, random_pipeline


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny")


def multidiffusion_by_hand(pipe, prompt, seed, width, height, tile, stride, steps, cfg):
    """MultiDiffusion's rule as its paper states it, for one image: every window takes its own CFG Euler step from
    the current latents, and the next latents are the average of the stepped windows covering each pixel."""
    text = pipe.encode_prompts([prompt, ""])
    noise = pipe.initial_noise(seed, 1, height, width)
    (h, w), n, step = noise.shape[-2:], tile // 8, stride // 8
    sigmas = sampling.schedule(steps, "simple", sampling.resolve_shift(None, (n // 2) ** 2))
    starts = lambda size: sorted(set(range(0, size - n, step)) | {size - n})  # noqa: E731
    x = noise * sigmas[0]
    for t, s in zip(sigmas[:-1], sigmas[1:]):
        stepped, count = torch.zeros_like(x), torch.zeros_like(x)
        for y in starts(h):
            for left in starts(w):
                crop = x[..., y:y + n, left:left + n]
                v_c, v_u = unpack(pipe.transformer(pack(torch.cat([crop, crop])), image_ids(2, n // 2, n // 2),
                                                   text.embeds, torch.zeros(*text.mask.shape, 3), t.expand(2),
                                                   txt_mask=text.mask), n, n).chunk(2)
                stepped[..., y:y + n, left:left + n] += crop + (s - t) * (v_u + cfg * (v_c - v_u))
                count[..., y:y + n, left:left + n] += 1
        x = stepped / count
    return x


def test_multidiffusion_is_the_average_of_the_stepped_windows(pipe):
    prompts, kw = ["a red circle", "a blue square"], dict(width=128, height=64, steps=3, cfg=2.0)
    out = pipe(prompts, seed=7, tile=64, tile_stride=32, tile_batch=2, progress=False, **kw)  # 3 windows: 2 + 1
    assert out.image.size == (128, 64) and out.settings["tile"] == 64 and out.settings["tile_stride"] == 32
    for i, prompt in enumerate(prompts):
        expected = multidiffusion_by_hand(pipe, prompt, 7 + i, tile=64, stride=32, **kw)
        torch.testing.assert_close(out.latents[i:i + 1], expected, atol=2e-5, rtol=0)


def test_multidiffusion_with_the_step_cache_and_a_window_larger_than_the_canvas(pipe):
    kw = dict(width=128, height=64, tile=64, cfg=2.0, steps=3, seed=1, progress=False)
    plain = pipe("x", **kw)
    cached = pipe("x", cache="fbc", cache_threshold=0.0, **kw)  # one cache per window batch; 0 never skips
    assert cached.settings["cache"]["full_passes"] == cached.settings["cache"]["calls"] == 3
    torch.testing.assert_close(cached.latents, plain.latents, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="clamped"):
        whole = pipe("x", width=64, height=64, tile=128, seed=1, progress=False)
    assert "windows clamped" in whole.settings["adjustments"][0]
    assert torch.equal(whole.latents, pipe("x", width=64, height=64, seed=1, progress=False).latents)


def test_region_prompts_weight_each_prompt_by_its_mask(pipe):
    kw = dict(width=64, height=64, seed=3, progress=False)
    everywhere = pipe("a red circle", regions=[("a blue square", np.ones((64, 64)))], **kw)
    nowhere = pipe("a red circle", regions=[("a blue square", np.zeros((64, 64)))], **kw)
    torch.testing.assert_close(everywhere.latents, pipe("a blue square", **kw).latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(nowhere.latents, pipe("a red circle", **kw).latents, atol=1e-6, rtol=0)
    assert everywhere.settings["regions"] == ["a blue square"]
    half = np.zeros((64, 128))
    half[:, :64] = 1
    split = pipe("a red circle", regions=[("a blue square", half)], width=128, height=64, tile=64, seed=3,
                 progress=False)
    assert split.image.size == (128, 64) and torch.isfinite(split.latents).all()
    with pytest.raises(ValueError, match="region mask 1 is 64x64 but the image is 128x64"):
        pipe("a", regions=[("b", np.ones((64, 64)))], width=128, height=64, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(tile=40), "multiple of 16"), (dict(tile=64, tile_stride=12), "multiple of 8"),
    (dict(tile=64, tile_stride=80), "at most the tile"), (dict(tile_stride=32), "needs tile"),
    (dict(tile=64, tile_batch=0), "tile_batch")])
def test_bad_tiling_is_refused_with_the_reason(pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe("a", progress=False, **kw)


# --- tiled VAE ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_and_image():
    vae = VAE.load(BUILTIN_DIR / "vae")  # the trained built-in VAE: seams show on real images, not on noise
    image = render(sample_scene(np.random.default_rng(3), "count"), 256)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return vae, x


LEVEL = 2 / 255  # one 8-bit grey level in [-1, 1] units


def seam_excess(tiled, full):
    """How much larger the mean step across each column and row boundary is than in the untiled decode: a seam
    is a line of extra contrast the full height or width of the image. Returns the largest, per column / row."""
    def steps(images, dim):
        return images.diff(dim=dim).abs().mean(dim=tuple(d for d in range(4) if d != dim % 4))
    return max(float((steps(tiled, d) - steps(full, d)).max()) for d in (-1, -2))


def test_tiled_decode_has_no_seams_and_stays_close(vae_and_image):
    vae, x = vae_and_image
    with torch.no_grad():
        z = vae.encode(x)
        full, blended, cut = vae.decode(z), vae.decode(z, tile=128, overlap=32), vae.decode(z, tile=128, overlap=0)
    assert (blended - full).abs().mean() < 0.01
    assert seam_excess(blended, full) < LEVEL / 2  # no boundary gains even half a grey level
    assert seam_excess(cut, full) > LEVEL  # the same measure sees the seam of unblended tiles


def test_tiled_encode_matches_and_memory_is_bounded_by_the_tile(vae_and_image):
    vae, x = vae_and_image
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.append((type(m).__name__, tuple(args[0].shape[-2:]))))
             for m in (vae.ae.encoder, vae.ae.decoder)]
    try:
        with torch.no_grad():
            z = vae.encode(x, tile=96)
            vae.decode(z, tile=96)
    finally:
        for hook in hooks:
            hook.remove()
    assert max(max(s) for name, s in sizes if name == "Encoder") <= 96  # pixels
    assert max(max(s) for name, s in sizes if name == "Decoder") <= 96 // 8  # latents
    with torch.no_grad():
        assert (z - vae.encode(x)).abs().mean() < 0.1 * vae.encode(x).abs().mean()


def test_pipeline_vae_tile_and_bad_tiles(pipe):
    out = pipe("x", width=128, height=128, vae_tile=64, seed=0, progress=False)
    assert out.image.size == (128, 128) and out.settings["vae_tile"] == 64
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe("x", vae_tile=60, progress=False)
    with pytest.raises(ValueError, match="below the tile"):
        pipe.vae.decode(torch.zeros(1, 16, 8, 8), tile=32, overlap=32)
