"""Shared builders for tests: small random models in real formats, made locally (nothing is downloaded)."""

import torch

WORDS = "a red blue green circle square above below left of the big small кот собака 红 色 圆".split()


def make_tiny_t5(folder, tokenizer_folder=None):
    """A random 2-layer T5 encoder and a small Unigram T5 tokenizer, built locally."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    model = T5EncoderModel(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(tokenizer_folder or folder)
    return model, tok
