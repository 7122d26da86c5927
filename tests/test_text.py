"""Text encoders: Chroma's mask rule, byte tokenizer, ByteTextEncoder, offline T5 loading."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import make_tiny_t5

from chromaflow.models.text import (
    ByteTextEncoder,
    ByteTextEncoderConfig,
    ByteTokenizer,
    T5TextEncoder,
    TextEncoding,
    chroma_mask,
    load_text_encoder,
)

TINY = ByteTextEncoderConfig(width=32, depth=2, heads=2, max_length=24, out_dim=16)


def _mask(*rows):
    return torch.tensor(rows, dtype=torch.bool)


# --- chroma_mask ---------------------------------------------------------------------------------------------------

def test_chroma_mask_short_prompt_shows_one_pad():
    m = chroma_mask(_mask([1, 1, 1, 0, 0, 0]))
    assert m.dtype == torch.bool
    assert m.tolist() == [[True, True, True, True, False, False]]


def test_chroma_mask_full_length_has_no_room_for_pad():
    assert chroma_mask(_mask([1, 1, 1, 1])).tolist() == [[True] * 4]
    assert chroma_mask(_mask([1, 1, 1, 0])).tolist() == [[True] * 4]


def test_chroma_mask_batch_and_extra_pads():
    mask = _mask([1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1])
    assert chroma_mask(mask).int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert chroma_mask(mask, extra_pads=2).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(chroma_mask(mask, extra_pads=0), mask)


# --- ByteTokenizer -------------------------------------------------------------------------------------------------

def test_byte_tokenizer_multibyte_round_trip_and_eos():
    tok = ByteTokenizer(max_length=64)
    prompts = ["a red circle", "красный круг", "红色的圆", ""]
    ids, mask = tok(prompts)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (4, 64)
    assert tok.decode(ids) == prompts
    for row, m, p in zip(ids, mask, prompts):
        n = len(p.encode("utf-8")) + 1
        assert m.sum() == n and m[:n].all()  # real bytes + EOS, contiguous
        assert row[n - 1] == tok.eos_id and (row[n:] == tok.pad_id).all()
    assert ids.max() < tok.vocab_size


def test_byte_tokenizer_truncation_keeps_eos_and_longest_padding():
    tok = ByteTokenizer(max_length=8)
    ids, mask = tok(["abcdefghijkl", "ab"])
    assert ids.shape == (2, 8) and mask[0].all()
    assert ids[0, -1] == tok.eos_id and tok.decode(ids[:1]) == ["abcdefg"]
    ids, mask = tok(["abcd", "ab"], padding="longest")  # longest row + EOS, plus the one pad Chroma shows
    assert ids.shape == (2, 6) and mask.sum(1).tolist() == [5, 3] and ids[0, 5] == tok.pad_id
    assert tok(["abcdefghijkl"], padding="longest")[0].shape == (1, 8)  # no room left for a pad
    with pytest.raises(ValueError, match="padding"):
        tok(["a"], padding="do_not_pad")


# --- ByteTextEncoder -----------------------------------------------------------------------------------------------

def test_byte_encoder_shapes_and_gradients():
    torch.manual_seed(0)
    enc = ByteTextEncoder(TINY)
    out = enc.encode(["a blue square", "синий квадрат"])
    assert isinstance(out, TextEncoding)
    assert out.embeds.shape == (2, 24, 16) and out.mask.shape == (2, 24) and out.mask.dtype == torch.bool
    assert enc.out_dim == 16 and enc.max_length == 24
    out.embeds[out.mask].square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize("pool, pool_kernel, rope_theta", [(1, 0, 0), (4, 0, 0), (4, 8, 0), (4, 8, 100)])
def test_byte_encoder_padding_invariance(pool, pool_kernel, rope_theta):
    torch.manual_seed(0)
    enc = ByteTextEncoder(replace(TINY, pool=pool, pool_kernel=pool_kernel, rope_theta=rope_theta)).eval()
    prompts = ["a red circle", "зелёный", "圆"]
    with torch.no_grad():
        full = enc.encode(prompts, padding="max_length")
        short = enc.encode(prompts, padding="longest")
    L = short.embeds.shape[1]
    assert torch.equal(full.mask[:, :L], short.mask) and not full.mask[:, L:].any()
    assert (~short.mask).all(0)[-1]  # every row ends in one group of pure padding
    # real tokens (and the pad that chroma_mask shows) do not depend on how many pads follow
    visible = chroma_mask(short.mask)
    torch.testing.assert_close(full.embeds[:, :L][visible], short.embeds[visible], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        alone = enc.encode(prompts[2:], padding="longest")
    n = alone.embeds.shape[1]
    torch.testing.assert_close(alone.embeds[0], full.embeds[2, :n], atol=1e-5, rtol=1e-5)


def test_byte_encoder_save_load_identical(tmp_path):
    torch.manual_seed(0)
    enc = ByteTextEncoder(TINY).eval()
    enc.save(tmp_path / "te")
    assert json.loads((tmp_path / "te" / "config.json").read_text())["chromaflow_model"] == "ByteTextEncoder"
    for loaded in (ByteTextEncoder.load(tmp_path / "te"), load_text_encoder(tmp_path / "te")):
        assert isinstance(loaded, ByteTextEncoder) and loaded.config == TINY
        with torch.no_grad():
            a, b = enc.encode(["hello", "мир"]), loaded.eval().encode(["hello", "мир"])
        assert torch.equal(a.embeds, b.embeds) and torch.equal(a.mask, b.mask)


def test_load_text_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_text_encoder(tmp_path / "missing")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        load_text_encoder(tmp_path / "bert")


# --- T5 ------------------------------------------------------------------------------------------------------------

def test_t5_encoder_offline_with_mask(tmp_path):
    model, tok = make_tiny_t5(tmp_path / "t5")
    enc = T5TextEncoder(tmp_path / "t5", max_length=16)
    prompts = ["a red circle above a blue square", "big кот", ""]
    out = enc.encode(prompts)
    ref = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert out.embeds.shape == (3, 16, 32) and enc.out_dim == 32
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, ref["attention_mask"].bool())
    assert out.mask.sum(1).tolist()[2] == 1  # empty prompt = just EOS
    with torch.no_grad():  # Chroma runs T5 with the tokenizer mask
        expected = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
        unmasked = model(input_ids=ref["input_ids"]).last_hidden_state
    torch.testing.assert_close(out.embeds, expected)
    assert not torch.allclose(out.embeds[0], unmasked[0])


def test_t5_layouts_and_detection(tmp_path):
    # diffusers pipeline layout: text_encoder/ + tokenizer/
    make_tiny_t5(tmp_path / "pipe" / "text_encoder", tmp_path / "pipe" / "tokenizer")
    a = load_text_encoder(tmp_path / "pipe", max_length=8).encode(["a big circle"])
    b = load_text_encoder(tmp_path / "pipe" / "text_encoder", max_length=8).encode(["a big circle"])
    c = T5TextEncoder(tmp_path / "pipe" / "text_encoder", tokenizer_path=tmp_path / "pipe" / "tokenizer",
                      max_length=8, dtype=torch.bfloat16).encode(["a big circle"])
    assert torch.equal(a.embeds, b.embeds) and c.embeds.dtype == torch.bfloat16
    assert load_text_encoder(tmp_path / "pipe").max_length == 512


def test_t5_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        T5TextEncoder(tmp_path / "nowhere")
    make_tiny_t5(tmp_path / "enc", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        T5TextEncoder(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="enc"):
        T5TextEncoder(tmp_path / "enc", tokenizer_path=tmp_path / "elsewhere")


def test_byte_encoder_overlapping_pool_sees_neighbouring_bytes():
    torch.manual_seed(0)
    enc = ByteTextEncoder(replace(TINY, pool=4, pool_kernel=8))
    x = torch.randn(1, TINY.width, 16)
    y = x.clone()
    y[..., 8] += 1.0  # first byte of group 2: groups 1 and 2 see it (2 bytes of overlap each side), group 0 does not
    changed = (enc.downsample(x) - enc.downsample(y)).abs().amax(1)[0] > 0
    assert changed.tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="pool_kernel"):
        replace(TINY, pool=4, pool_kernel=7)


def test_byte_encoder_pooling_merges_bytes_into_fewer_tokens():
    enc = ByteTextEncoder(replace(TINY, pool=4))
    out = enc.encode(["a red circle", "круг"])  # 12 and 8 bytes + EOS
    assert out.embeds.shape[1] == 5 and out.mask.sum(1).tolist() == [4, 3]  # ceil(13/4) + one pad group


@pytest.mark.parametrize("rope_theta", [0, 100])
def test_byte_encoder_rope_lets_a_token_see_word_order(rope_theta):
    # with the absolute positions zeroed, attention alone is blind to order: the middle byte of "xay" and of "yax"
    # comes out the same; rotary positions make it depend on which neighbour stands on which side
    torch.manual_seed(0)
    enc = ByteTextEncoder(replace(TINY, rope_theta=rope_theta)).eval()
    with torch.no_grad():
        enc.pos.zero_()
        a, b = enc.encode(["xay", "yax"]).embeds[:, 1]
    assert torch.allclose(a, b, atol=1e-5) == (rope_theta == 0)
    with pytest.raises(ValueError, match="rope_theta"):
        replace(TINY, rope_theta=-1.0)
