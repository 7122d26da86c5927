"""Flux VAE: latent packing, normalisation, diffusers-folder and BFL single-file round trips."""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from safetensors.torch import save_file

from chromaflow.models.vae import VAE, flux_vae_config, load_vae, pack, small_vae_config, unpack

SMALL = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)


def _small_vae(seed=0):
    torch.manual_seed(seed)
    vae = VAE(small_vae_config(**SMALL)).eval()
    with torch.no_grad():  # norms start at 1 / 0: perturb every tensor so a mis-mapped key cannot hide
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _same_weights(a: VAE, b: VAE):
    sa, sb = a.ae.state_dict(), b.ae.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- packing -------------------------------------------------------------------------------------------------------

def test_pack_unpack_inverse_and_ordering():
    lat = torch.randn(2, 16, 6, 10)
    tok = pack(lat)
    assert tok.shape == (2, 15, 64)
    assert torch.equal(unpack(tok, 6, 10), lat)
    # feature index c*4 + ph*2 + pw, tokens row-major over the (h/2, w/2) grid
    c, i, j, ph, pw = 5, 2, 3, 1, 0
    assert tok[1, i * 5 + j, c * 4 + ph * 2 + pw] == lat[1, c, 2 * i + ph, 2 * j + pw]
    assert torch.equal(tok, FluxPipeline._pack_latents(lat, 2, 16, 6, 10))
    assert torch.equal(FluxPipeline._unpack_latents(tok, 48, 80, 8), unpack(tok, 6, 10))
    with pytest.raises(ValueError):
        pack(torch.randn(1, 16, 5, 4))
    with pytest.raises(ValueError):
        unpack(tok, 6, 8)


# --- configs -------------------------------------------------------------------------------------------------------

def test_flux_config_matches_bfl_autoencoder():
    with torch.device("meta"):
        vae = VAE(flux_vae_config())
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683  # BFL ae.safetensors
    assert vae.downsample == 8 and vae.latent_channels == 16
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    sd = vae.original_state_dict()
    # BFL numbers decoder levels by resolution: up.0 is the full-resolution 128-channel level, without upsample
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.3.block.2.conv1.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "decoder.up.3.upsample.conv.weight" in sd
    assert "encoder.down.3.downsample.conv.weight" not in sd and "encoder.down.0.downsample.conv.weight" in sd
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)


def test_small_config_validation():
    assert small_vae_config()["latent_channels"] == 16
    with pytest.raises(ValueError, match="4 levels"):
        small_vae_config(block_out_channels=(8, 8, 8))


def test_five_level_small_vae_downsamples_16x():
    """A fifth level halves once more: 256 px images become 16x16 latents, and decode inverts the shape."""
    torch.manual_seed(0)
    vae = VAE(small_vae_config(block_out_channels=(8, 8, 8, 8, 8), norm_num_groups=1)).eval()
    assert vae.downsample == 16
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, 64, 96) * 2 - 1)
        assert z.shape == (1, 16, 4, 6)
        assert vae.decode(z).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="divisible by 16"):
        vae.encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match="norm_num_groups"):
        small_vae_config(block_out_channels=(8, 8, 8, 12), norm_num_groups=8)


# --- encode / decode -----------------------------------------------------------------------------------------------

def test_encode_decode_shapes_and_normalisation():
    vae = _small_vae()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images)
        mean = vae.ae.encode(images).mean
        x = vae.decode(z)
        raw = vae.ae.decode(z / 0.5 + 0.1)
    assert z.shape == (2, 16, 4, 6) and vae.downsample == 8
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    assert x.shape == images.shape
    torch.testing.assert_close(x, raw)
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 30, 32))


@pytest.mark.parametrize("extra", [{}, {"use_quant_conv": True, "use_post_quant_conv": True, "layers_per_block": 2}])
def test_same_network_as_diffusers_autoencoder_kl(extra):
    """Our autoencoder and diffusers' AutoencoderKL, loaded with the same weights, compute the same posterior and
    images (the mid-block attention, quant convs and multi-resnet levels included)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(3)
    config = {**small_vae_config(**SMALL), **extra}
    vae = VAE(config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = vae.to_diffusers().eval()
    assert type(ref) is AutoencoderKL and ref.config.layers_per_block == config["layers_per_block"]
    images, z = torch.rand(2, 3, 32, 48) * 2 - 1, torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        ours, theirs = vae.ae.encode(images), ref.encode(images).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vae.ae.decode(z), ref.decode(z).sample, rtol=1e-4, atol=1e-5)


def test_unsupported_vae_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="up_block_types.*UpDecoderBlock2D"):
        VAE({**small_vae_config(), "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        VAE({**small_vae_config(), "act_fn": "gelu"})


def test_batch_rows_equal_single_images():
    vae = _small_vae()
    images, z = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(vae.encode(images)[1], vae.encode(images[1:2])[0])
        assert torch.equal(vae.decode(z)[1], vae.decode(z[1:2])[0])


# --- saving / loading ----------------------------------------------------------------------------------------------

def test_diffusers_folder_round_trip(tmp_path):
    vae = _small_vae()
    vae.save(tmp_path / "vae")
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    for loaded in (load_vae(tmp_path / "vae"), VAE.load(tmp_path)):  # also via a pipeline folder's vae/
        _same_weights(vae, loaded)
        assert (loaded.scaling_factor, loaded.shift_factor) == (0.5, 0.1)
        images = torch.rand(1, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            assert torch.equal(vae.encode(images), loaded.encode(images))
    half = load_vae(tmp_path / "vae", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_bfl_single_file_loads_same_weights(tmp_path):
    vae = _small_vae()
    original = vae.original_state_dict()
    assert original["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1-conv layout, as in ae.safetensors
    # independent oracle: diffusers' own LDM -> diffusers converter gives our diffusers state dict
    converted = convert_ldm_vae_checkpoint(dict(original), small_vae_config(**SMALL))
    ours = vae.ae.state_dict()
    assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)

    save_file(original, tmp_path / "ae.safetensors")
    loaded = load_vae(tmp_path / "ae.safetensors", norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)
    _same_weights(vae, loaded)
    assert loaded.ae.config.block_out_channels == [8, 16, 16, 16] and loaded.ae.config.layers_per_block == 1
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(images), loaded.encode(images))
    # a full checkpoint that nests the autoencoder under a prefix
    save_file({"first_stage_model." + k: v for k, v in original.items()}, tmp_path / "full.safetensors")
    _same_weights(vae, load_vae(tmp_path / "full.safetensors", norm_num_groups=4))
    # without overrides a single file gets Flux's normalisation
    assert load_vae(tmp_path / "ae.safetensors", norm_num_groups=4).scaling_factor == 0.3611


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_vae(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_vae(tmp_path / "junk.safetensors")
    vae = _small_vae()
    save_file(vae.ae.state_dict(), tmp_path / "diffusers_layout.safetensors")
    with pytest.raises(ValueError, match="diffusers layout"):
        load_vae(tmp_path / "diffusers_layout.safetensors")
    original = vae.original_state_dict()
    save_file({k: v for k, v in original.items() if "decoder.conv_out" not in k}, tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_vae(tmp_path / "cut.safetensors", norm_num_groups=4)
    save_file({**original, "encoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        load_vae(tmp_path / "extra.safetensors", norm_num_groups=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_vae(tmp_path / "empty")
