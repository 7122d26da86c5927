"""The MMDiT: exact preset sizes, equivalence with diffusers' reference models, Chroma's masking rule."""

import json

import pytest
import torch

from chromaflow.cli import main
from chromaflow.formats.layouts import original_to_diffusers
from chromaflow.models.transformer import (_SwapPairs, apply_rope, build, count_parameters, image_ids,
                                           position_embedding, timestep_embedding)


@pytest.mark.parametrize("name, params, tensors", [("chroma", 8_899_983_424, 643),
                                                   ("flux-dev", 11_901_408_320, 780),
                                                   ("flux-schnell", 11_891_178_560, 776)])
def test_full_presets_have_reference_sizes(name, params, tensors):
    model = build(name, device="meta")
    assert count_parameters(model) == params
    assert len(model.state_dict()) == tensors


def test_info_reports_preset_parameters(capsys):
    assert main(["info", "--preset", "chroma", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 8_899_983_424


def random_model(name, seed=0):
    torch.manual_seed(seed)
    model = build(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # non-trivial norms and biases too, so every weight matters
    return model


def diffusers_reference(model):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    p = model.params
    kw = dict(patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
              attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
              axes_dims_rope=p.axes_dim)
    if p.variant == "chroma":
        ref = ChromaTransformer2DModel(**kw, approximator_num_channels=p.approximator_in_dim,
                                       approximator_hidden_dim=p.approximator_hidden,
                                       approximator_layers=p.approximator_depth)
    else:
        ref = FluxTransformer2DModel(**kw, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed)
    ref.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def inputs(model, rows, cols, lengths, txt_len=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    img = torch.randn(b, rows * cols, model.params.in_channels, generator=g)
    txt = torch.randn(b, txt_len, model.params.context_in_dim, generator=g)
    mask = torch.arange(txt_len)[None] < torch.tensor(lengths)[:, None]
    t = torch.rand(b, generator=g)
    return img, image_ids(b, rows, cols), txt, torch.zeros(b, txt_len, 3), t, mask


@pytest.mark.parametrize("rows, cols", [(4, 4), (6, 3), (2, 7)])
def test_chroma_matches_diffusers(rows, cols):
    model = random_model("tiny")
    ref = diffusers_reference(model)
    img, ids, txt, txt_ids, t, mask = inputs(model, rows, cols, lengths=[5, 9, 12])
    with torch.no_grad():
        ours = model(img, ids, txt, txt_ids, t, txt_mask=mask)
        # a boolean joint mask: diffusers forms m_q * m_k from it, SDPA then hides (not biases) the pads
        joint = torch.cat([mask, torch.ones(img.shape[:2], dtype=torch.bool)], 1)
        theirs = ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=ids[0], txt_ids=txt_ids[0],
                     attention_mask=joint).sample
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("rows, cols", [(4, 4), (3, 5)])
def test_flux_matches_diffusers(rows, cols):
    model = random_model("tiny-flux")
    ref = diffusers_reference(model)
    img, ids, txt, txt_ids, t, _ = inputs(model, rows, cols, lengths=[12, 12])
    y, guidance = torch.randn(2, model.params.vec_in_dim), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ours = model(img, ids, txt, txt_ids, t, guidance=guidance, y=y)
        theirs = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                     guidance=guidance, img_ids=ids[0], txt_ids=txt_ids[0]).sample
    assert (ours - theirs).abs().max() <= 1e-4


def test_hidden_pads_have_no_influence_and_can_be_dropped():
    model = random_model("tiny")
    img, ids, txt, txt_ids, t, mask = inputs(model, 4, 4, lengths=[3, 7])
    with torch.no_grad():
        full = model(img, ids, txt, txt_ids, t, txt_mask=mask, drop_masked=False)
        dropped = model(img, ids, txt, txt_ids, t, txt_mask=mask, drop_masked=True)
        scrambled = txt.clone()
        scrambled[~mask] = torch.randn(int((~mask).sum()), txt.shape[-1]) * 100
        after_scramble = model(img, ids, scrambled, txt_ids, t, txt_mask=mask, drop_masked=False)
        # each row alone, truncated to its visible tokens, with no mask at all
        alone = torch.cat([model(img[i:i + 1], ids[:1], txt[i:i + 1, :n], txt_ids[:1, :n], t[i:i + 1])
                           for i, n in enumerate([3, 7])])
    assert (full - dropped).abs().max() <= 1e-5
    assert (full - after_scramble).abs().max() <= 1e-5
    assert (full - alone).abs().max() <= 1e-5
    # and the mask does matter: attending to the pads changes the output
    with torch.no_grad():
        unmasked = model(img, ids, txt, txt_ids, t)
    assert (full - unmasked).abs().max() > 1e-3


def test_chroma_modulation_rows_are_sliced_as_specified():
    model = random_model("tiny")
    p = model.params
    t = torch.tensor([0.25])
    mods = model.modulations(t)
    rows = torch.cat([timestep_embedding(t, 16).expand(p.mod_index_length, -1),
                      timestep_embedding(torch.zeros(1), 16).expand(p.mod_index_length, -1),  # guidance 0
                      timestep_embedding(torch.arange(p.mod_index_length), 32)], -1)
    with torch.no_grad():
        out = model.distilled_guidance_layer(rows)[None]
    ns = 3 * p.depth_single_blocks
    for i in range(p.depth_single_blocks):
        torch.testing.assert_close(mods.single[i], out[:, 3 * i:3 * i + 3])
    for i in range(p.depth):
        torch.testing.assert_close(mods.double[i][0], out[:, ns + 6 * i:ns + 6 * i + 6])
        torch.testing.assert_close(mods.double[i][1], out[:, ns + 6 * p.depth + 6 * i:ns + 6 * p.depth + 6 * i + 6])
    torch.testing.assert_close(mods.final, out[:, -2:])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model("tiny").train()
    img, ids, txt, txt_ids, t, mask = inputs(model, 4, 4, lengths=[3, 7])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(img, ids, txt, txt_ids, t, txt_mask=mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_each_channel_pair_by_its_position_angle_with_exact_gradients(dtype):
    """apply_rope against the rotation written out per pair as a complex product, values and gradients."""
    torch.manual_seed(0)
    axes, theta = (4, 6, 6), 10_000
    ids = torch.cat([torch.zeros(2, 3, 3), image_ids(2, 3, 4)], 1)
    x = torch.randn(2, 3, ids.shape[1], sum(axes)).to(dtype).requires_grad_()
    angles = []
    for axis, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., axis].double()[..., None] * omega)
    turn = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, -1))[:, None]  # (B, 1, L, D/2)
    x64 = x.detach().double().requires_grad_()
    expected = torch.view_as_real(torch.view_as_complex(x64.unflatten(-1, (-1, 2)).contiguous()) * turn).flatten(-2)
    got = apply_rope(x, position_embedding(ids, axes, theta))
    assert got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16: 8-bit mantissa
    torch.testing.assert_close(got.double(), expected.to(dtype).double(), **tol)
    weights = torch.randn(got.shape, dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad.to(dtype).double(), **tol)


def test_the_compiled_rope_swap_is_a_flip_of_each_pair_with_the_flip_as_its_gradient():
    """_SwapPairs (64-bit word rotation, taken under torch.compile) against flipping each (x[2j], x[2j+1])."""
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    flipped = x.detach().unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    swapped = _SwapPairs.apply(x)
    assert torch.equal(swapped, flipped)
    weights = torch.randn(x.shape)
    (swapped * weights).sum().backward()
    assert torch.equal(x.grad, weights.unflatten(-1, (-1, 2)).flip(-1).flatten(-2))


def test_short_training_attention_uses_the_math_backend_with_the_flash_kernels_values_and_gradients(monkeypatch):
    """At <= SHORT_TRAINING_KEYS keys with gradients, attention switches SDPA backend; the result must not change."""
    import chromaflow.models.transformer as transformer
    torch.manual_seed(0)
    ids = torch.cat([torch.zeros(2, 4, 3), image_ids(2, 4, 4)], 1)
    assert ids.shape[1] <= transformer.SHORT_TRAINING_KEYS
    pe = position_embedding(ids, (4, 6, 6), 10_000)
    key_mask = torch.ones(2, ids.shape[1], dtype=torch.bool)
    key_mask[1, 3] = False
    inputs = [torch.randn(2, 3, ids.shape[1], 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    weights = torch.randn(2, ids.shape[1], 48)
    results = []
    for threshold, kernel in ((transformer.SHORT_TRAINING_KEYS, "math"), (0, "flash")):
        monkeypatch.setattr(transformer, "SHORT_TRAINING_KEYS", threshold)
        for x in inputs:
            x.grad = None
        with torch.profiler.profile() as prof:
            out = transformer.attention(*inputs, pe, key_mask)
        assert any(kernel in e.key for e in prof.key_averages() if "scaled_dot_product" in e.key)
        (out.float() * weights).sum().backward()
        results.append([out.detach().float()] + [x.grad.float() for x in inputs])
    for ours, flash in zip(*results):
        torch.testing.assert_close(ours, flash, atol=2e-2, rtol=2e-2)  # bf16 inputs, float32 softmax in both
