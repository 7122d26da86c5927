"""Low-bit linears and files: int8 weight-only, NF4 (bitsandbytes), ComfyUI scaled fp8; quantized models load,
run, save and convert."""

import json

import pytest
import torch
import torch.nn.functional as F

from chromaflow.formats.checkpoint import save_checkpoint
from chromaflow.formats.convert import convert_checkpoint
from chromaflow.formats.inspect import describe
from chromaflow.formats.layouts import load_transformer, save_transformer
from chromaflow.models.precision import runnable
from chromaflow.models.quant import QuantLinear, dequantize_packed, is_quantized, pack_weight, quantize_model
from test_layouts import assert_same_state, random_model, run

NF4_CODE = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                         0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


def weight(rows=96, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_is_per_row_absmax():
    w = weight()
    w[3] *= 100  # one large row must not cost the others their precision
    p = pack_weight(w, "int8")
    assert p.tensors["weight"].dtype == torch.int8 and p.tensors["scale"].shape == (96,)
    assert torch.equal(p.tensors["weight"].abs().amax(1), torch.full((96,), 127, dtype=torch.int8))
    back = dequantize_packed(p)
    assert (back - w).abs().max(1).values[0] <= p.tensors["scale"][0] / 2 + 1e-7
    assert rel(back[4:], w[4:]) < 0.01


def test_fp8_is_e4m3_with_one_scale():
    w = weight()
    p = pack_weight(w, "fp8")
    assert p.tensors["weight"].dtype == torch.float8_e4m3fn and p.tensors["scale"].numel() == 1
    assert float(p.tensors["weight"].float().abs().max()) == 448.0  # the absmax lands on e4m3's largest value
    assert rel(dequantize_packed(p), w) < 0.04


def test_nf4_blocks_of_64_with_double_quantized_scales():
    w = weight()
    p = pack_weight(w, "nf4")
    assert p.tensors["weight"].numel() == w.numel() // 2  # two 4-bit codes per byte
    assert p.tensors["absmax"].dtype == torch.uint8  # absmax itself quantized to 8 bits (double quantization)
    assert p.info["state"]["blocksize"] == 64 and p.info["state"]["quant_type"] == "nf4"
    back = dequantize_packed(p)
    assert rel(back, w) < 0.12
    # every block of 64 values is one scale times the 16-entry NF4 code book
    for block in back.reshape(-1, 64)[:8]:
        scale = block.abs().max()
        codes = block / scale
        assert torch.isclose(codes[:, None], NF4_CODE[None, :], atol=2e-3).any(1).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4", "Q8_0", "Q4_K"])
def test_quant_linear_matches_a_linear_with_the_expanded_weight(fmt):
    w, bias, x = weight(64, 256), torch.randn(64), torch.randn(5, 256)
    layer = QuantLinear(pack_weight(w, fmt), bias, torch.float32)
    expected = F.linear(x, layer.weight, bias)
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.nbytes() < w.numel() * 2  # smaller than bfloat16


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4", "Q5_0"])
def test_quantize_model_keeps_sensitive_layers_and_saves_expanded(tmp_path, fmt):
    model = random_model("tiny")
    reference = run(model)
    count = quantize_model(model, fmt)
    assert count == 2 * 8 + 2 * 2  # per double block 8 block Linears, per single block 2
    assert type(model.img_in) is torch.nn.Linear and type(model.txt_in) is torch.nn.Linear
    assert type(model.distilled_guidance_layer.layers[0].in_layer) is torch.nn.Linear
    assert isinstance(model.double_blocks[0].img_attn.qkv, QuantLinear)
    assert rel(run(model), reference) < {"int8": 0.02, "fp8": 0.06, "nf4": 0.2, "Q5_0": 0.1}[fmt]
    state = model.state_dict()  # expanded weights under the usual names
    assert set(state) == set(random_model("tiny").state_dict())
    path = save_transformer(model, tmp_path / "expanded.safetensors")
    plain, _ = load_transformer(path, dtype=torch.float32)
    assert not is_quantized(plain) and torch.allclose(run(plain), run(model), atol=1e-5)


def comfy_scaled_fp8(model, path):
    """A checkpoint the way ComfyUI writes scaled fp8: prefixed keys, e4m3 weights, scale_weight / scale_input, and
    the `scaled_fp8` marker."""
    out, expanded = {}, {}
    for key, t in model.state_dict().items():
        if key.endswith(".weight") and t.ndim == 2 and key.startswith(("double_blocks", "single_blocks")):
            scale = t.abs().max() / 448
            q = (t / scale).to(torch.float8_e4m3fn)
            out["model.diffusion_model." + key] = q
            out["model.diffusion_model." + key[:-7] + ".scale_weight"] = scale.reshape(())
            out["model.diffusion_model." + key[:-7] + ".scale_input"] = torch.ones(())
            expanded[key] = q.float() * scale
        else:
            out["model.diffusion_model." + key] = t.to(torch.bfloat16)
            expanded[key] = t.to(torch.bfloat16).float()
    out["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_checkpoint(out, path)
    return expanded


def test_comfyui_scaled_fp8_checkpoint_loads_scaled_and_stays_fp8(tmp_path):
    model = random_model("tiny")
    expanded = comfy_scaled_fp8(model, tmp_path / "fp8.safetensors")
    loaded, info = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert info["quantized"] == {"float8_e4m3fn": 20} and info["prefix"] == "model.diffusion_model."
    layer = loaded.double_blocks[0].img_attn.qkv
    assert isinstance(layer, QuantLinear) and layer.q_weight.dtype == torch.float8_e4m3fn
    reference = random_model("tiny")
    reference.load_state_dict(expanded)
    assert torch.allclose(run(loaded), run(reference), atol=1e-5)  # exactly W_fp8 * scale_weight
    info = describe(tmp_path / "fp8.safetensors")
    assert info["format"] == "safetensors (fp8)" and info["architecture"] == "chroma"
    assert "float8_e4m3fn+scale" in info["dtypes"]


@pytest.mark.parametrize("to", ["fp8", "int8", "nf4"])
def test_convert_to_low_bit_files_and_back(tmp_path, to):
    model = random_model("tiny-flux")
    src = save_transformer(model, tmp_path / "src.safetensors", title="flux test", resolution="64x64")
    dst = convert_checkpoint(src, tmp_path / f"{to}.safetensors", to)
    info = describe(dst)
    assert info["format"] == f"safetensors ({to})" and info["architecture"] == "flux-dev"
    assert info["modelspec"]["title"] == "flux test" and info["modelspec"]["resolution"] == "64x64"
    loaded, load_info = load_transformer(dst, dtype=torch.float32)
    assert sum(load_info["quantized"].values()) == 2 * 10 + 2 * 3  # flux blocks also have modulation Linears
    assert rel(run(loaded), run(model)) < {"fp8": 0.06, "int8": 0.02, "nf4": 0.2}[to]
    back = convert_checkpoint(dst, tmp_path / "back.safetensors", "original", dtype=torch.float32)
    plain, _ = load_transformer(back)
    assert_same_state({k: v for k, v in plain.state_dict().items()},
                      {k: v for k, v in loaded.state_dict().items()})
    assert json.loads(describe(back)["metadata"]["chromaflow.params"])["variant"] == "flux"


def test_quantize_while_loading(tmp_path):
    model = random_model("tiny")
    path = save_transformer(model, tmp_path / "m.safetensors")
    loaded, info = load_transformer(path, quantize="Q8_0")
    assert info["quantized"] == {"Q8_0": 20} and info["dtype"] == str(runnable(torch.bfloat16)).split(".")[-1]
    assert rel(run(loaded).float(), run(model)) < 0.05
