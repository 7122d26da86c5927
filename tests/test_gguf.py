"""GGUF: per-type dequantization against the gguf package's reference, our K-quant quantizers, files as ComfyUI-GGUF
and stable-diffusion.cpp read them, memory-mapped quantized loading, and clear errors for bad files."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFReader
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize

from chromaflow.formats import ggml
from chromaflow.formats.checkpoint import CheckpointError
from chromaflow.formats.gguf import save_gguf
from chromaflow.formats.layouts import load_transformer, modelspec
from chromaflow.models.quant import QuantLinear
from test_layouts import random_model, run

BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
F32_LAYERS = ("img_in.", "final_layer.linear.", "distilled_guidance_layer.in_proj.", "time_in.in_layer.",
              "vector_in.in_layer.", "guidance_in.in_layer.")  # kept in F32, as ComfyUI-GGUF's quantizer does
# byte offsets of each block's float16 scale fields (random bytes there could be inf / nan)
F16_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q4_K: [0, 2],
              QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def random_blocks(t: QT, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Arbitrary raw data of type t: every bit pattern random except finite float16 scales."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[t][1]
    raw = rng.integers(0, 256, (rows, blocks_per_row * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in F16_FIELDS[t]:
        blocks[:, at:at + 2] = rng.uniform(-0.05, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_the_reference_bit_for_bit(t):
    raw = random_blocks(t, rows=3, blocks_per_row=2)
    expected = reference_dequantize(raw, t)
    ours = ggml.dequantize(torch.from_numpy(raw), t, expected.shape)
    assert ours.dtype == torch.float32 and np.array_equal(ours.numpy(), expected)


def test_float_types_dequantize_like_the_reference():
    x = torch.randn(4, 64)
    for t in (QT.F32, QT.F16, QT.BF16):
        raw = ggml.quantize(x, t)
        expected = reference_dequantize(raw.numpy(), t)
        assert np.array_equal(ggml.dequantize(raw, t, tuple(x.shape)).numpy(), expected), t.name


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantize_round_trip_error_fits_the_bit_budget(t):
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    raw = ggml.quantize(x, t)
    assert raw.dtype == torch.uint8 and raw.shape == (16, ggml.row_bytes(t, 512))
    back = torch.from_numpy(reference_dequantize(raw.numpy(), t))  # decoded by the reference, not by us
    rel = float((back - x).norm() / x.norm())
    bits = int(t.name[1])  # bits per quantized value: Q4_0 -> 4
    assert rel < 2.0 ** -(bits - 1.5), (t.name, rel)  # within ~2x of a uniform quantizer with this many levels
    if t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):  # legacy types: the package's own quantizer
        assert np.array_equal(raw.numpy(), reference_quantize(x.numpy(), t))


def test_k_quants_beat_legacy_types_of_the_same_size():
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(1))

    def error(t):
        return float((ggml.dequantize(ggml.quantize(x, t), t, tuple(x.shape)) - x).norm() / x.norm())

    assert error(QT.Q4_K) < error(QT.Q4_0)  # same 4.5 bits per weight
    assert error(QT.Q5_K) < error(QT.Q5_0)  # 5.5 bits per weight
    assert error(QT.Q6_K) < error(QT.Q5_K)


def test_rows_must_fit_the_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.quantize(torch.randn(2, 96), QT.Q4_K)


# --- files ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return random_model("tiny")


def write(model, path, qtype, **kw):
    arch = "chroma" if model.params.variant == "chroma" else "flux-dev"
    return save_gguf(model.state_dict(), path, qtype, metadata=modelspec(arch, "test model", resolution="64x64"), **kw)


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
def test_file_has_what_comfyui_gguf_and_sd_cpp_expect(tmp_path, name):
    model = random_model(name)
    path = write(model, tmp_path / "m.gguf", "Q8_0")
    reader = GGUFReader(path)
    field = reader.get_field("general.architecture")
    assert field.contents() == "flux"  # the string both loaders accept for Flux and Chroma
    assert reader.get_field("general.quantization_version").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    assert set(tensors) == set(state)  # original-layout names, no prefix
    for key, t in tensors.items():
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == tuple(state[key].shape), key
        if state[key].ndim == 1 or key.startswith(F32_LAYERS):
            assert t.tensor_type == QT.F32, key
        elif key.startswith(("txt_in.", "distilled_guidance_layer.", "time_in.", "vector_in.", "guidance_in.")):
            assert t.tensor_type == QT.F16, key
        elif key.startswith(("double_blocks.", "single_blocks.")):
            assert t.tensor_type == QT.Q8_0, key
    # every tensor decodes, with the reference, to the model's weights within Q8_0 precision
    for key, t in tensors.items():
        values = reference_dequantize(np.asarray(t.data), t.tensor_type).reshape(state[key].shape)
        assert np.allclose(values, state[key].numpy(), atol=0.01 * float(state[key].abs().max()) + 1e-6), key


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_0", "Q4_K", "Q6_K", "BF16"])
def test_loaded_model_stays_quantized_and_memory_mapped(tmp_path, tiny_model, qtype):
    path = write(tiny_model, tmp_path / f"m-{qtype}.gguf", qtype)
    model, info = load_transformer(path, dtype=torch.float32)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant and info["quantized"].get(qtype, 0) > 0
    raw = next(m.q_raw for m in quant if m.info["type"].name == qtype)
    assert raw.dtype == torch.uint8  # blocks, not floats
    # the bytes are a view of the file mapping, not a copy
    maps = Path("/proc/self/maps").read_text().splitlines()
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps if line.endswith(str(path))]
    assert any(lo <= raw.data_ptr() < hi for lo, hi in ranges)
    error = float((run(model) - run(tiny_model)).norm() / run(tiny_model).norm())
    assert error < {"Q8_0": 0.02, "Q5_1": 0.08, "Q4_0": 0.15, "Q4_K": 0.1, "Q6_K": 0.03, "BF16": 0.01}[qtype]


def test_sd_cpp_style_prefix_and_metadata_round_trip(tmp_path, tiny_model):
    state = {"model.diffusion_model." + k: v for k, v in tiny_model.state_dict().items()}
    path = save_gguf(state, tmp_path / "p.gguf", "F16", metadata=modelspec("chroma", "prefixed", resolution="64x64"))
    model, info = load_transformer(path, dtype=torch.float32)
    assert info["prefix"] == "model.diffusion_model." and info["architecture"] == "chroma"
    assert info["metadata"]["modelspec.title"] == "prefixed" and info["metadata"]["modelspec.resolution"] == "64x64"
    assert float((run(model) - run(tiny_model)).abs().max()) < 1e-2


def test_lazy_tensors_are_written_one_at_a_time(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    reads = []

    class Lazy(dict):
        def __getitem__(self, key):
            reads.append(key)
            return state[key]

    lazy = Lazy.fromkeys(state)
    save_gguf(lazy, tmp_path / "lazy.gguf", "Q4_0", shapes={k: tuple(v.shape) for k, v in state.items()})
    assert reads == list(state)  # each tensor fetched exactly once, in order
    model, _ = load_transformer(tmp_path / "lazy.gguf", dtype=torch.float32)
    assert float((run(model) - run(tiny_model)).norm() / run(tiny_model).norm()) < 0.15


# --- bad files ------------------------------------------------------------------------------------------------

def one_line_error(call, pattern: str) -> str:
    with pytest.raises(CheckpointError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and re.search(pattern, message), message
    return message


def test_truncated_file_names_the_tensor(tmp_path, tiny_model):
    path = write(tiny_model, tmp_path / "full.gguf", "Q4_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-5000])
    message = one_line_error(lambda: load_transformer(cut), r"truncated: tensor '.+' ends at byte")
    assert "cut.gguf" in message
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(path.read_bytes()[:40])
    one_line_error(lambda: load_transformer(header_only), r"truncated or corrupt GGUF header")


def test_unknown_quantization_type_names_the_tensor(tmp_path, tiny_model):
    path = write(tiny_model, tmp_path / "ok.gguf", "Q8_0")
    reader = GGUFReader(path)
    victim = next(t for t in reader.tensors if t.tensor_type == QT.Q8_0)
    type_field = victim.field.parts[4]  # the tensor-info's uint32 type
    offset = type_field.ctypes.data - reader.data.ctypes.data
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    one_line_error(lambda: load_transformer(bad), rf"tensor '{re.escape(victim.name)}' has unknown ggml quantization "
                                                  r"type 99")


def test_other_architectures_and_non_gguf_files_are_refused(tmp_path, tiny_model):
    from gguf import GGUFWriter
    path = tmp_path / "sdxl.gguf"
    writer = GGUFWriter(path, arch="sdxl")
    writer.add_tensor("input_blocks.0.0.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(lambda: load_transformer(path), r"GGUF architecture is 'sdxl', not a Flux / Chroma transformer")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(200))
    one_line_error(lambda: load_transformer(junk), r"not a GGUF file")


def test_cli_converts_between_formats_and_describes_them(tmp_path, tiny_model, capsys):
    import json as json_
    from chromaflow.cli import main
    from chromaflow.formats.layouts import save_transformer
    src = save_transformer(tiny_model, tmp_path / "src.safetensors", title="tiny chroma", resolution="64x64")
    assert main(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf:Q4_K"]) == 0
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "diffusers"), "--to", "diffusers",
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.gguf"), "--json"]) == 0
    info = json_.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["architecture"] == "chroma" and info["dtypes"]["Q4_K"] == 4
    assert info["modelspec"]["title"] == "tiny chroma" and info["modelspec"]["resolution"] == "64x64"
    gguf_model, _ = load_transformer(tmp_path / "m.gguf", dtype=torch.float32)
    diffusers_model, info = load_transformer(tmp_path / "diffusers", dtype=torch.float32)
    assert info["layout"] == "diffusers" and torch.allclose(run(gguf_model), run(diffusers_model), atol=1e-5)
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:-100])
    assert main(["convert", str(tmp_path / "cut.gguf"), str(tmp_path / "x.safetensors"), "--to", "original"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "truncated: tensor" in error
