"""LoRA: kohya / diffusers / original naming onto fused layers, runtime and merged application, exact removal,
several LoRAs with strengths, clear errors, training and export."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from chromaflow.engine.train import TrainConfig, train
from chromaflow.formats.checkpoint import CheckpointError, open_checkpoint, save_checkpoint
from chromaflow.formats.convert import convert_lora
from chromaflow.formats.inspect import describe
from chromaflow.formats.layouts import load_transformer, save_transformer
from chromaflow.formats.lora import linear_shapes, lora_tensors, parse_lora, read_lora, save_lora
from chromaflow.models.lora import apply_loras
from chromaflow.models.quant import quantize_model
from chromaflow.models.transformer import build
from test_layouts import random_model, run

H = 64  # hidden size of the tiny presets


def pair(out_rows, in_features, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_features, generator=g) * 0.1, torch.randn(out_rows, rank, generator=g) * 0.1


def merged_weights(model, files, mode="merge"):
    handle = apply_loras(model, files, mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle.remove()
    return state, handle


def test_three_namings_land_on_the_same_rows_of_fused_layers(tmp_path):
    """kohya on the fused qkv, diffusers on to_q / proj_mlp (row slices of qkv / linear1), original naming on
    linear2: each merged weight is exactly W + alpha/rank * up @ down on the right rows."""
    model = random_model("tiny")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    qkv_down, qkv_up = pair(3 * H, H, seed=1)
    q_down, q_up = pair(H, H, seed=2)
    mlp_down, mlp_up = pair(4 * H, H, seed=3)
    l2_down, l2_up = pair(H, 5 * H, seed=4)
    save_checkpoint({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_down,
                     "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_up,
                     "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}, tmp_path / "kohya.safetensors")
    save_checkpoint({"transformer.transformer_blocks.1.attn.to_q.lora_A.weight": q_down,
                     "transformer.transformer_blocks.1.attn.to_q.lora_B.weight": q_up,
                     "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": mlp_down,
                     "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": mlp_up},
                    tmp_path / "diffusers.safetensors")
    save_checkpoint({"diffusion_model.single_blocks.1.linear2.lora_A.weight": l2_down,
                     "diffusion_model.single_blocks.1.linear2.lora_B.weight": l2_up}, tmp_path / "bfl.safetensors")
    files = [(tmp_path / n, s) for n, s in (("kohya.safetensors", 1.0), ("diffusers.safetensors", 0.5),
                                            ("bfl.safetensors", 2.0))]
    state, handle = merged_weights(model, files)
    assert [r["layout"] for r in handle.reports] == ["kohya", "diffusers", "original"]
    expected = {k: v.clone() for k, v in base.items()}
    expected["double_blocks.0.img_attn.qkv.weight"] += 0.5 * qkv_up @ qkv_down  # alpha 1 / rank 2
    expected["double_blocks.1.img_attn.qkv.weight"][:H] += 0.5 * q_up @ q_down  # rows of q only
    expected["single_blocks.0.linear1.weight"][3 * H:] += 0.5 * mlp_up @ mlp_down  # the MLP rows after q, k, v
    expected["single_blocks.1.linear2.weight"] += 2.0 * l2_up @ l2_down
    for key in base:
        assert torch.allclose(state[key], expected[key], atol=1e-6), key
    # and removing them restored the exact original weights
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_saved_layouts_runtime_and_merge_agree_and_remove_exactly(tmp_path, name, layout):
    model = random_model(name)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = run(model)
    shapes = linear_shapes(model)
    adapters = {m[:-7]: (*pair(s[0], s[1], rank=3, seed=i), 6.0) for i, (m, s) in enumerate(shapes.items())}
    path = save_lora(adapters, tmp_path / "l.safetensors", shapes, layout,
                     architecture="chroma" if name == "tiny" else "flux-dev", title="t")
    outputs = {}
    for mode in ("runtime", "merge"):
        handle = apply_loras(model, [(path, 0.7)], mode)
        assert handle.reports[0]["patched_layers"] == len(shapes) and not handle.reports[0]["unmatched"]
        outputs[mode] = run(model)
        handle.remove()
        assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
        assert torch.equal(run(model), base_out)
    assert torch.allclose(outputs["runtime"], outputs["merge"], atol=1e-5)
    assert float((outputs["runtime"] - base_out).abs().max()) > 1e-2
    # the same ΔW, computed by hand, merged directly
    for module, (down, up, alpha) in adapters.items():
        with torch.no_grad():
            model.get_submodule(module).weight += 0.7 * alpha / 3 * up @ down
    assert torch.allclose(run(model), outputs["merge"], atol=1e-5)


def test_several_loras_with_strengths_add_up():
    model = random_model("tiny")
    shapes = linear_shapes(model)
    a = {m[:-7]: (*pair(s[0], s[1], seed=1), 2.0) for m, s in shapes.items() if "double_blocks.0" in m}
    b = {m[:-7]: (*pair(s[0], s[1], seed=2), 2.0) for m, s in shapes.items() if "single_blocks" in m}
    la = parse_lora(lora_tensors(a, shapes, "kohya"), shapes, "a")
    lb = parse_lora(lora_tensors(b, shapes, "diffusers"), shapes, "b")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = {}
    for strength in (1.0, -2.0):
        state, _ = merged_weights(model, [(la, strength), (lb, 0.0)])
        deltas[strength] = {k: state[k] - base[k] for k in base}
    for k in base:  # ΔW scales with the strength; strength 0 leaves its layers alone
        assert torch.allclose(deltas[-2.0][k], -2 * deltas[1.0][k], atol=1e-6), k
        assert ("double_blocks.0." in k and k.endswith("weight")) or not deltas[1.0][k].any(), k
    h = apply_loras(model, [(la, 1.0), (lb, 1.0)], "merge")
    both = run(model)
    h.remove()
    h = apply_loras(model, [(la, 1.0), (lb, 1.0)], "runtime")
    assert torch.allclose(run(model), both, atol=1e-5)
    h.remove()


def test_quantized_base_gets_runtime_loras(tmp_path):
    model = random_model("tiny")
    quantize_model(model, "Q8_0")
    shapes = linear_shapes(model)
    adapters = {"double_blocks.0.img_attn.qkv": (*pair(3 * H, H), 2.0), "img_in": (*pair(H, 64), 2.0)}
    path = save_lora(adapters, tmp_path / "q.safetensors", shapes)
    before = run(model)
    with pytest.raises(ValueError, match="cannot merge a LoRA into quantized layers"):
        apply_loras(model, [(path, 1.0)], "merge")
    handle = apply_loras(model, [(path, 1.0)], "auto")  # hook on the quantized qkv, merge into the plain img_in
    assert len(handle.hooks) == 1 and list(handle.backups) == ["img_in"]
    assert not torch.equal(run(model), before)
    handle.remove()
    assert torch.equal(run(model), before)


def test_diffusers_own_kohya_converter_gives_the_same_delta():
    """Peer check at full Chroma shapes (a few layers only): diffusers converts our kohya file to its names (splitting
    fused qkv / linear1); reading that gives exactly the ΔW of our kohya file."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    shapes = linear_shapes(build("chroma", device="meta"))
    modules = ["double_blocks.0.img_attn.qkv", "double_blocks.2.txt_attn.qkv", "double_blocks.2.img_mlp.0",
               "single_blocks.7.linear1", "single_blocks.7.linear2"]
    adapters = {m: (*pair(*shapes[m + ".weight"], seed=i), 8.0) for i, m in enumerate(modules)}
    ours = lora_tensors(adapters, shapes, "kohya")
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(ours))
    assert any(".attn.to_q.lora_A" in k for k in theirs) and any(".proj_mlp.lora_B" in k for k in theirs)
    a, b = parse_lora(ours, shapes, "ours"), parse_lora(theirs, shapes, "diffusers-converted")
    assert b.layout == "diffusers" and not b.unmatched
    for m in modules:
        probe = torch.randn(shapes[m + ".weight"][1], 4, dtype=torch.float64)

        def delta_times_probe(lora):  # ΔW @ probe, without forming the (up to 21504 x 3072) ΔW
            out = torch.zeros(shapes[m + ".weight"][0], 4, dtype=torch.float64)
            for p in lora.patches[m]:
                rows = p.rows if p.rows is not None else slice(None)
                out[rows] += p.scale * p.up.double() @ (p.down.double() @ probe)
            return out
        assert torch.allclose(delta_times_probe(a), delta_times_probe(b), rtol=1e-9, atol=1e-12), m


# --- errors and reports ---------------------------------------------------------------------------------------

def test_nothing_matching_is_an_error_listing_keys(tmp_path):
    shapes = linear_shapes(random_model("tiny"))
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}
    save_checkpoint(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError) as e:
        read_lora(tmp_path / "sdxl.safetensors", shapes)
    message = str(e.value)
    assert "\n" not in message and "none of its 2 keys match" in message and "Stable Diffusion UNet" in message
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in message
    save_checkpoint(sdxl, tmp_path / "declared.safetensors",
                    {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    with pytest.raises(CheckpointError, match="a LoRA for 'stable-diffusion-xl-v1-base/lora'.*not for Chroma"):
        read_lora(tmp_path / "declared.safetensors", shapes)


def test_flux_lora_on_chroma_is_partial_and_reported(tmp_path):
    flux_shapes, chroma_shapes = linear_shapes(random_model("tiny-flux")), linear_shapes(random_model("tiny"))
    adapters = {m: (*pair(*flux_shapes[m + ".weight"]), 2.0) for m in
                ("double_blocks.0.img_attn.proj", "double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin")}
    path = save_lora(adapters, tmp_path / "flux.safetensors", flux_shapes, architecture="flux-dev")
    with pytest.warns(UserWarning, match=r"2 LoRA keys match no layer of this chroma transformer.*modulation"):
        lora = read_lora(path, chroma_shapes)
    assert list(lora.patches) == ["double_blocks.0.img_attn.proj"]
    assert sorted(lora.unmatched) == ["lora_unet_double_blocks_0_img_mod_lin",
                                      "lora_unet_single_blocks_0_modulation_lin"]


def test_wrong_model_size_and_other_variants_are_errors(tmp_path):
    tiny_shapes = linear_shapes(random_model("tiny"))
    full = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}
    with pytest.raises(CheckpointError, match=r"lora_unet_double_blocks_0_img_attn_qkv.*down \(4, 3072\).*needs down "
                                              r"\(rank, 64\).*another model size"):
        parse_lora(full, tiny_shapes, "full.safetensors")
    loha = {"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match="LoHa"):
        parse_lora(loha, tiny_shapes, "loha.safetensors")


def test_convert_and_inspect_a_lora(tmp_path):
    model = random_model("tiny")
    shapes = linear_shapes(model)
    adapters = {"double_blocks.1.txt_attn.qkv": (*pair(3 * H, H), 4.0),
                "single_blocks.1.linear1": (*pair(7 * H, H), 4.0)}
    kohya = save_lora(adapters, tmp_path / "k.safetensors", shapes, title="mine", resolution="64x64")
    diffusers = convert_lora(kohya, tmp_path / "d.safetensors", "diffusers", base="tiny")
    back = convert_lora(diffusers, tmp_path / "k2.safetensors", "kohya", base="tiny")
    info = describe(diffusers)
    assert info["kind"] == "lora" and info["lora"]["layout"] == "diffusers" and info["lora"]["layers"] == 3 + 4
    assert info["modelspec"]["architecture"] == "chroma/lora" and info["modelspec"]["title"] == "mine"
    outs = []
    for path in (kohya, diffusers, back):
        h = apply_loras(model, [(path, 1.0)])
        outs.append(run(model))
        h.remove()
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)
    with pytest.raises(CheckpointError, match="is a lora for chroma.*not a model"):
        load_transformer(kohya)


# --- training ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    from chromaflow.models.vae import VAE, small_vae_config
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    VAE(small_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)).save(folder / "vae")
    save_transformer(random_model("tiny"), folder / "transformer.safetensors")
    return folder


def lora_config(base_files, **kw):
    return TrainConfig(name="concept", base=str(base_files / "transformer.safetensors"), vae=str(base_files / "vae"),
                       text_encoder=dict(width=32, depth=1, heads=2, max_length=64), lr=1e-2,
                       stages=[{"steps": 4, "size": 32, "batch_size": 2}], warmup_steps=1, checkpoint_every=2,
                       log_every=1,
                       lora={"rank": 4, "alpha": 2, "targets": ["double_blocks.*", "single_blocks.*.linear1"]},
                       defaults={"width": 64, "height": 64, "steps": 2, "cfg": 1.0}, **kw)


def test_lora_training_freezes_the_base_resumes_and_exports(base_files, tmp_path):
    cfg = lora_config(base_files)
    straight = train(cfg, tmp_path / "a", progress=False)
    base, _ = load_transformer(base_files / "transformer.safetensors", dtype=torch.float32)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in straight.transformer.state_dict().items())
    with open_checkpoint(next((tmp_path / "a").glob("ckpt-*")) / "model.safetensors") as ckpt:
        assert ckpt.keys() and all(k.startswith("lora.") for k in ckpt.keys())  # adapters only, not the base
    # stopped and resumed: bit-identical adapters
    train(cfg, tmp_path / "b", progress=False, stop_after=3)
    resumed = train(cfg, tmp_path / "b", progress=False)
    assert all(torch.equal(v, straight.lora.state_dict()[k]) for k, v in resumed.lora.state_dict().items())
    # exported in both layouts with ModelSpec; applied to the base they reproduce the trained model
    kohya = tmp_path / "a" / "concept-lora.safetensors"
    diffusers = tmp_path / "a" / "concept-lora-diffusers.safetensors"
    meta = describe(kohya)["modelspec"]
    assert meta["architecture"] == "chroma/lora" and meta["resolution"] == "64x64" and meta["title"] == "concept"
    with open_checkpoint(kohya) as ckpt:
        assert "lora_unet_single_blocks_0_linear1.alpha" in ckpt and ckpt.metadata["ss_network_dim"] == "4"
    trained_out = run(straight.transformer)  # hooks still attached: base + adapters
    assert not torch.equal(trained_out, run(base))
    for path in (kohya, diffusers):
        h = apply_loras(base, [(path, 1.0)], "runtime")
        assert torch.allclose(run(base), trained_out, atol=1e-5)
        h.remove()


def test_lora_config_needs_rank_and_base(base_files, tmp_path):
    cfg = lora_config(base_files)
    with pytest.raises(ValueError, match="needs a rank"):
        train(replace(cfg, lora={"alpha": 1}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="set `base`"):
        train(replace(cfg, base="", model={"preset": "tiny"}), tmp_path, progress=False)


def test_pipeline_load_applies_loras(tmp_path):
    from chromaflow.pipeline.loading import load
    pipe = load("tiny")
    shapes = linear_shapes(pipe.transformer)
    path = save_lora({"single_blocks.0.linear2": (*pair(H, 5 * H), 2.0)}, tmp_path / "p.safetensors", shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean match: no partial-match warning
        pipe = load("tiny", loras=[(path, 0.8)])
    report = pipe.applied_loras.reports[0]
    assert report["patched_layers"] == 1 and report["strength"] == 0.8
    plain = load("tiny")
    assert not torch.equal(pipe.transformer.single_blocks[0].linear2.weight,
                           plain.transformer.single_blocks[0].linear2.weight)
    pipe.applied_loras.remove()
    assert torch.equal(pipe.transformer.single_blocks[0].linear2.weight,
                       plain.transformer.single_blocks[0].linear2.weight)
    json.dumps(report)  # reports are plain data (CLI / server can print them)


def test_cli_trains_a_lora_recipe_on_a_model_folder(tmp_path):
    from chromaflow.cli import main
    from chromaflow.pipeline.loading import load, random_pipeline, save_folder
    base = save_folder(random_pipeline("tiny"), tmp_path / "base")
    recipe = {"train": {"name": "mine", "base": str(base), "lora": {"rank": 2}, "warmup_steps": 1,
                        "stages": [{"steps": 2, "size": 32, "batch_size": 2}],
                        "defaults": {"width": 32, "height": 32, "steps": 2, "cfg": 1.0}},
              "eval": {"n_per_category": 1}}
    (tmp_path / "lora.json").write_text(json.dumps(recipe))
    assert main(["train", str(tmp_path / "lora.json"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "eval.json").is_file() and not (tmp_path / "run" / "model").exists()
    lora = tmp_path / "run" / "dit" / "mine-lora.safetensors"
    pipe = load(base, loras=[(lora, 1.0)])  # text encoder and VAE came from the base folder
    assert pipe.applied_loras.reports[0]["patched_layers"] == 2 * 8 + 2 * 2


def test_generate_flag_applies_a_lora_with_its_strength(tmp_path):
    from chromaflow.cli import main
    from chromaflow.pipeline.loading import load
    shapes = linear_shapes(load("tiny").transformer)
    path = save_lora({"single_blocks.0.linear2": (*pair(H, 5 * H), 2.0)}, tmp_path / "p.safetensors", shapes)
    common = ["--model", "tiny", "--seed", "3", "--steps", "2", "--quiet"]

    def pixels(name, *extra):
        assert main(["generate", "a red circle", "-o", str(tmp_path / name), *common, *extra]) == 0
        return np.asarray(Image.open(tmp_path / name))
    plain = pixels("plain.png")
    off = pixels("off.png", "--lora", f"{path}:0")
    on = pixels("on.png", "--lora", f"{path}:1.5")
    assert np.array_equal(plain, off) and not np.array_equal(plain, on)
