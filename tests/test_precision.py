"""Half-precision weights run in a dtype that is fast on the machine: bf16 only where bf16 matmuls are native."""

import warnings

import pytest
import torch

from chromaflow.formats.layouts import load_transformer, save_transformer
from chromaflow.models import precision
from chromaflow.models.precision import bf16_autocast, fast_bf16, run_fast, runnable
from chromaflow.models.text import ByteTextEncoder, ByteTextEncoderConfig, load_text_encoder
from chromaflow.models.transformer import build


@pytest.mark.parametrize("forced, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_stored_bf16_runs_in_bf16_only_where_it_is_fast(tmp_path, monkeypatch, forced, expected):
    monkeypatch.setenv("CHROMAFLOW_FAST_BF16", forced)
    assert fast_bf16("cpu") == (forced == "1") and runnable(torch.bfloat16) == expected
    model = build("tiny")
    path = save_transformer({k: v.bfloat16() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors",
                            params=model.params)
    loaded, info = load_transformer(path)
    assert loaded.img_in.weight.dtype == expected and info["dtype"] == str(expected).split(".")[-1]
    assert load_transformer(path, dtype=torch.bfloat16)[0].img_in.weight.dtype == torch.bfloat16  # asked: kept
    encoder = ByteTextEncoder(ByteTextEncoderConfig(width=32, depth=1, heads=2, max_length=16)).to(torch.bfloat16)
    assert next(run_fast(encoder).parameters()).dtype == expected
    encoder.save(tmp_path / "te")
    assert next(load_text_encoder(tmp_path / "te", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_fp32_weights_and_fp16_on_cpu(monkeypatch):
    monkeypatch.setenv("CHROMAFLOW_FAST_BF16", "1")
    assert runnable(torch.float32) == torch.float32
    assert runnable(torch.float16) == (torch.float16 if torch.cpu._is_amx_fp16_supported() else torch.float32)


def test_bf16_autocast_falls_back_to_fp32_with_one_warning(monkeypatch):
    a = torch.randn(8, 8)
    monkeypatch.setenv("CHROMAFLOW_FAST_BF16", "1")
    with bf16_autocast("cpu"):
        assert (a @ a).dtype == torch.bfloat16
    monkeypatch.setenv("CHROMAFLOW_FAST_BF16", "0")
    precision._warn_emulated.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with bf16_autocast("cpu"):
                assert (a @ a).dtype == torch.float32
    assert len([w for w in caught if "no native bf16" in str(w.message)]) == 1  # once per process
    with bf16_autocast("cpu", enabled=False):
        assert (a @ a).dtype == torch.float32
