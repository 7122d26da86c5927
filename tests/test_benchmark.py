"""The benchmark harness: FLOP counts, a fair peer (same outputs), and a smoke run of the whole suite."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from chromaflow import benchmark
from chromaflow.models.text import chroma_mask
from chromaflow.models.transformer import build, image_ids


def test_forward_flops_match_a_flop_counter():
    model = build("tiny")
    p, side, visible, batch = model.params, 4, 7, 2
    txt, mask = benchmark.random_text(p, batch, visible)
    img = torch.randn(batch, side * side, p.in_channels)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(img, image_ids(batch, side, side), txt, torch.zeros(batch, txt.shape[1], 3), torch.rand(batch),
              txt_mask=mask)
    # the counter sees every matmul but not CPU attention kernels: compare the linear part exactly
    assert benchmark.forward_flops(p, side * side, visible, batch)["linear"] == counter.get_total_flops()


def test_peer_gets_padded_text_and_computes_the_same_velocity():
    model = build("tiny")
    with torch.no_grad():
        for q in model.parameters():
            q.normal_(0, 0.1)
    ref = benchmark.peer_transformer(model)
    real = torch.arange(10)[None] < torch.tensor([[6], [9]])
    embeds = torch.randn(2, 10, model.params.context_in_dim)
    padded, mask = benchmark.pad_text(embeds, real, length=40)
    assert padded.shape[1] == 40 and mask.sum(1).tolist() == [7, 10]  # real tokens + Chroma's one pad
    img, ids, t = torch.randn(2, 9, 64), image_ids(2, 3, 3), torch.rand(2)
    with torch.no_grad():
        ours = model(img, ids, embeds, torch.zeros(2, 10, 3), t, txt_mask=chroma_mask(real))
        joint = torch.cat([mask, torch.ones(2, 9, dtype=torch.bool)], 1)
        theirs = ref(hidden_states=img, encoder_hidden_states=padded, timestep=t, img_ids=ids[0],
                     txt_ids=torch.zeros(40, 3), attention_mask=joint, return_dict=False)[0]
    assert (ours - theirs).abs().max() < 1e-4


def test_quick_suite_reports_every_figure_with_ratios():
    report = benchmark.run(quick=True, repeats=1)
    assert report["matmul_peak_gflops"]["fp32"] > 0 and report["matmul_peak_gflops"]["bf16"] > 0
    for name in ("transformer", "txt2img"):
        assert report[name]["ours_s"] > 0 and report[name]["peer_s"] > 0 and report[name]["ratio"] > 0
    assert report["transformer"]["mfu"] > 0
    assert report["train"]["ours_sps"] > 0 and report["train"]["peer_sps"] > 0
    assert report["txt2img"]["pixel_mean_abs_diff"] < 1.0  # same noise, same weights: the same image
    assert "| txt2img" in benchmark.table(report)


def test_bench_command_prints_one_json_object(capsys):
    import json

    from chromaflow.cli import main
    assert main(["bench", "--quick", "--no-peer", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["txt2img"]["ours_s"] > 0 and report["txt2img"]["peer_s"] is None
