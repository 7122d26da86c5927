"""Original <-> diffusers layouts: bit-exact conversion, detection, config inference, streaming load and save."""

import json
import warnings

import pytest
import torch

from chromaflow.formats import checkpoint
from chromaflow.formats.checkpoint import CheckpointError, open_checkpoint, save_checkpoint
from chromaflow.formats.inspect import describe
from chromaflow.formats.layouts import (
    default_axes_dim, detect_architecture, detect_layout, diffusers_config, diffusers_to_original, infer_params,
    load_transformer, original_to_diffusers, save_transformer, strip_prefix)
from chromaflow.models.transformer import PRESETS, build, count_parameters, preset

TINY = ["tiny", "tiny-flux"]


def random_model(name: str, **overrides):
    torch.manual_seed(0)
    model = build(preset(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # norms too: a swapped or misrouted tensor must change the output
    return model.eval()


def run(model) -> torch.Tensor:
    p, g = model.params, torch.Generator().manual_seed(1)
    img_ids = torch.zeros(1, 6, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(6) // 3, torch.arange(6) % 3
    kw = dict(guidance=torch.tensor([2.0]), y=torch.randn(1, p.vec_in_dim, generator=g)) if p.variant == "flux" else {}
    with torch.no_grad():
        return model(torch.randn(1, 6, p.in_channels, generator=g), img_ids,
                     torch.randn(1, 3, p.context_in_dim, generator=g), torch.zeros(1, 3, 3), torch.tensor([0.4]), **kw)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def shapes(tensors: dict) -> dict:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# --- conversion -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(name, dtype):
    state = random_model(name).to(dtype).state_dict()
    diffusers = original_to_diffusers(state)
    assert_same_state(diffusers_to_original(diffusers), state)


def test_flux_final_modulation_halves_are_swapped():
    state = random_model("tiny-flux").state_dict()
    h = state["img_in.weight"].shape[0]
    out = original_to_diffusers(state)["norm_out.linear.weight"]
    shift_scale = state["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(out[:h], shift_scale[h:]) and torch.equal(out[h:], shift_scale[:h])


@pytest.mark.parametrize("name,n_original,n_diffusers",
                         [("chroma", 643, 1023), ("flux-dev", 780, 1160), ("flux-schnell", 776, 1156)])
def test_full_presets_convert_on_meta(name, n_original, n_diffusers):
    state = build(name, device="meta").state_dict()
    diffusers = original_to_diffusers(state)
    assert (len(state), len(diffusers), len(diffusers_to_original(diffusers))) == (n_original, n_diffusers, n_original)
    assert infer_params(shapes(state)) == infer_params(shapes(diffusers)) == PRESETS[name]
    assert detect_architecture(diffusers) == detect_architecture(state) == name


def test_default_axes_rule():
    assert default_axes_dim(128) == (16, 56, 56)
    for head_dim in (32, 48, 64, 96, 256):
        axes = default_axes_dim(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 and a > 0 for a in axes)


# --- detection ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,arch", [("tiny", {}, "chroma"), ("tiny-flux", {}, "flux-dev"),
                                                 ("tiny-flux", {"guidance_embed": False}, "flux-schnell")])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "transformer."])
def test_detection(name, overrides, arch, prefix):
    state = build(preset(name, **overrides), device="meta").state_dict()
    for layout, keys in (("original", state), ("diffusers", original_to_diffusers(state))):
        prefixed = [prefix + k for k in keys] + ["first_stage_model.decoder.conv_in.weight"] * bool(prefix)
        assert detect_layout(prefixed) == layout and detect_architecture(prefixed) == arch
        assert list(strip_prefix(prefixed)) == list(keys)  # a full checkpoint's VAE keys are left out


def test_unknown_layout_lists_keys():
    with pytest.raises(CheckpointError, match="neither an original nor a diffusers layout.*'encoder.conv_in.weight'"):
        detect_layout(["encoder.conv_in.weight", "decoder.conv_out.weight"])
    with pytest.raises(CheckpointError, match="not a Chroma or Flux transformer.*'img_in.weight'"):
        detect_architecture(["img_in.weight", "double_blocks.0.img_attn.qkv.weight"])


# --- against diffusers ----------------------------------------------------------------------------------------

def diffusers_model(params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
        config = {k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
        return (ChromaTransformer2DModel if params.variant == "chroma" else FluxTransformer2DModel)(**config)


@pytest.mark.parametrize("name", TINY)
def test_diffusers_accepts_our_keys_and_agrees(name):
    model = random_model(name)
    ref = diffusers_model(model.params)
    ref.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    p, g = model.params, torch.Generator().manual_seed(2)
    img, txt, t = torch.randn(2, 6, p.in_channels, generator=g), torch.randn(2, 3, p.context_in_dim, generator=g), \
        torch.tensor([0.3, 0.8])
    img_ids = torch.stack([torch.zeros(6), torch.arange(6.0) // 3, torch.arange(6.0) % 3], -1)
    txt_ids = torch.zeros(3, 3)
    ours_kw, ref_kw = {}, {}
    if p.variant == "flux":  # values matter: the swapped final modulation and split qkv must line up
        y, guidance = torch.randn(2, p.vec_in_dim, generator=g), torch.tensor([3.5, 2.0])
        ours_kw, ref_kw = dict(y=y, guidance=guidance), dict(pooled_projections=y, guidance=guidance)
    with torch.no_grad():
        ours = model(img, img_ids.expand(2, -1, -1), txt, txt_ids.expand(2, -1, -1), t, **ours_kw)
        theirs = ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                     **ref_kw).sample
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_diffusers_from_pretrained_reads_our_folder(tmp_path):
    model = random_model("tiny")
    folder = save_transformer(model, tmp_path / "transformer", layout="diffusers", max_shard_size=40_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import ChromaTransformer2DModel
        ref = ChromaTransformer2DModel.from_pretrained(folder)
    assert_same_state(ref.state_dict(), original_to_diffusers(model.state_dict()))


def test_a_diffusers_folder_of_a_position_grid_model_warns_and_loads_back_the_grid(tmp_path):
    model = build(preset("tiny", position_grid=4))
    with pytest.warns(UserWarning, match="no equivalent of position_grid 4"):
        folder = save_transformer(model, tmp_path / "transformer", layout="diffusers")
    loaded, _ = load_transformer(folder)
    assert loaded.params.position_grid == 4 and loaded.params == model.params


# --- load / save ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_load_every_layout_gives_the_same_model(tmp_path, name):
    model = random_model(name)
    state, expected = model.state_dict(), run(model)
    prefixed = tmp_path / "prefixed.safetensors"
    save_checkpoint({"model.diffusion_model." + k: v for k, v in state.items()} | {"vae.x": torch.ones(1)}, prefixed,
                    {"chromaflow.params": json.dumps(model.params.to_dict())})
    sources = {
        "original": save_transformer(model, tmp_path / "orig.safetensors"),
        "diffusers": save_transformer(model, tmp_path / "diff.safetensors", layout="diffusers"),
        "sharded": save_transformer(model, tmp_path / "sharded", layout="diffusers", max_shard_size=20_000),
        "prefixed": prefixed,
    }
    assert len(open_checkpoint(sources["sharded"]).files) > 2
    for kind, path in sources.items():
        loaded, info = load_transformer(path)
        assert info["architecture"] == detect_architecture(state)
        assert info["layout"] == ("original" if kind in ("original", "prefixed") else "diffusers")
        assert loaded.params == model.params and not loaded.training
        assert_same_state(loaded.state_dict(), state)
        assert torch.equal(run(loaded), expected), kind
    assert load_transformer(prefixed)[1]["prefix"] == "model.diffusion_model."


def test_load_casts_and_infers_config_without_metadata(tmp_path):
    model = random_model("tiny")
    path = save_checkpoint(model.state_dict(), tmp_path / "bare.safetensors")  # no chromaflow.params
    loaded, info = load_transformer(path, dtype=torch.bfloat16)
    # shapes show neither RoPE axes (default rule) nor guidance_embed, which Chroma ignores (inferred True)
    inferred = preset("tiny", axes_dim=default_axes_dim(32), guidance_embed=True)
    assert loaded.params == inferred and info["dtype"] == "bfloat16"
    assert_same_state(loaded.state_dict(), {k: v.bfloat16() for k, v in model.state_dict().items()})
    # a diffusers folder without our metadata takes the RoPE axes from its config.json
    folder = save_transformer(model, tmp_path / "transformer", layout="diffusers")
    weights = folder / "diffusion_pytorch_model.safetensors"
    with open_checkpoint(weights) as ckpt:
        plain = {k: ckpt.get(k).clone() for k in ckpt.keys()}
    save_checkpoint(plain, weights)
    assert load_transformer(folder)[0].params == preset("tiny", guidance_embed=True)


@pytest.fixture
def tiny_file(tmp_path):
    model = random_model("tiny")
    meta = {"chromaflow.params": json.dumps(model.params.to_dict())}

    def write(change, layout="original"):
        state = model.state_dict() if layout == "original" else original_to_diffusers(model.state_dict())
        state = {k: v.clone() for k, v in state.items()}
        change(state)
        return save_checkpoint(state, tmp_path / f"{layout}.safetensors", meta)
    return write


def test_load_reports_missing_keys(tiny_file):
    path = tiny_file(lambda s: [s.pop(k) for k in ("txt_in.weight", "single_blocks.1.linear2.bias")])
    with pytest.raises(CheckpointError, match=r"original\.safetensors: .*2 missing keys: 'txt_in.weight', "
                                              r"'single_blocks.1.linear2.bias'"):
        load_transformer(path)


def test_load_reports_unexpected_keys(tiny_file):
    path = tiny_file(lambda s: s.update({"lora_up.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"original\.safetensors: .*1 unexpected keys: 'lora_up.weight'"):
        load_transformer(path)


def test_load_reports_wrong_shapes(tiny_file):
    path = tiny_file(lambda s: s.update({"double_blocks.0.img_attn.proj.weight": torch.zeros(64, 63)}))
    with pytest.raises(CheckpointError, match=r"original\.safetensors: .*double_blocks.0.img_attn.proj.weight "
                                              r"expected \(64, 64\), got \(64, 63\)"):
        load_transformer(path)
    path = tiny_file(lambda s: s.update({"transformer_blocks.0.attn.to_k.weight": torch.zeros(64, 60)}), "diffusers")
    with pytest.raises(CheckpointError, match=r"diffusers\.safetensors: .*cannot stack .*attn.to_k.weight"):
        load_transformer(path)


def test_load_reports_incomplete_diffusers_fusion(tiny_file):
    path = tiny_file(lambda s: s.pop("single_transformer_blocks.0.attn.to_v.bias"), "diffusers")
    with pytest.raises(CheckpointError, match=r"diffusers\.safetensors: missing 1 diffusers tensors.*"
                                              r"'single_transformer_blocks.0.attn.to_v.bias'"):
        load_transformer(path)


def test_load_rejects_other_models(tmp_path):
    path = save_checkpoint({"encoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: .*'encoder.conv_in.weight'"):
        load_transformer(path)


def test_save_writes_modelspec_and_params(tmp_path):
    model = random_model("tiny-flux")
    path = save_transformer(model, tmp_path / "m.safetensors", metadata={"modelspec.title": "mine", "x": 1})
    meta = open_checkpoint(path).metadata
    assert json.loads(meta["chromaflow.params"]) == model.params.to_dict()
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["modelspec.title"] == "mine" and meta["x"] == "1" and "modelspec.date" in meta
    meta = open_checkpoint(save_transformer(random_model("tiny"), tmp_path / "c", layout="diffusers")).metadata
    assert meta["modelspec.architecture"] == "chroma" and meta["modelspec.implementation"] == "diffusers"
    with pytest.raises(ValueError, match="single .safetensors file"):
        save_transformer(model, tmp_path / "folder")


# --- describe -------------------------------------------------------------------------------------------------

def test_describe_reads_headers_only(tmp_path, monkeypatch):
    model = random_model("tiny")
    sharded = save_transformer(model, tmp_path / "t", layout="diffusers", max_shard_size=20_000)
    monkeypatch.setattr(checkpoint.Checkpoint, "get", None)  # any tensor read would fail
    info = describe(sharded)
    assert (info["layout"], info["architecture"]) == ("diffusers", "chroma")
    assert info["parameters"] == count_parameters(model) and info["tensors"] == 100
    assert info["dtypes"] == {"float32": 100} and info["params"] == model.params.to_dict()
    assert len(info["files"]) > 2 and info["metadata"]["modelspec.architecture"] == "chroma"
    other = describe(save_checkpoint({"encoder.w": torch.zeros(2, 3)}, tmp_path / "vae.safetensors"))
    assert other["layout"] is None and other["parameters"] == 6 and "neither" in other["error"]


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS while loading grows by about the file size, not twice it (mapped pages are released)."""
    import subprocess
    import sys
    from chromaflow.models.transformer import MMDiTParams, build
    params = MMDiTParams(hidden_size=768, num_heads=12, depth=2, depth_single_blocks=4, context_in_dim=768,
                         axes_dim=(8, 28, 28), approximator_hidden=768, approximator_depth=2)
    path = save_transformer(build(params), tmp_path / "m.safetensors")
    size = path.stat().st_size
    # VmHWM (peak RSS) from /proc: unlike ru_maxrss it is not inherited from the forking pytest process
    script = ("import re, sys\nfrom chromaflow.formats.layouts import load_transformer\n"
              "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
              "before = peak()\nmodel, _ = load_transformer(sys.argv[1])\nprint(peak() - before)")
    grown = int(subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                               check=True).stdout)
    assert size * 0.9 < grown < size * 1.4, (grown, size)
