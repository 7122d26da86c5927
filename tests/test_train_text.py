"""Pretraining the byte-level text encoder on caption content: batches, learning, the saved folder."""

import json

import numpy as np
import pytest
import torch

from chromaflow.engine.shapes import (INVERSE, KINDS, LABEL_HEADS, LANGUAGES, PAIRS, RELATIONS, SIZES, Obj, Scene,
                                      caption_labels, with_filler)
from chromaflow.engine.train_text import (FACT_KINDS, FACTS_PER_PAIR, SPAN_HEADS, FactTokenReadout, TextTrainConfig,
                                          caption_batch, named_facts, span_targets, train_text_encoder)
from chromaflow.models.text import ByteTextEncoder, load_text_encoder


def test_caption_batches_are_deterministic_and_mix_languages():
    texts, labels, languages, kinds = caption_batch(0, 7, 40)
    again = caption_batch(0, 7, 40)
    assert texts == again[0] and torch.equal(labels, again[1]) and kinds == again[3]
    assert texts != caption_batch(0, 8, 40)[0]
    assert labels.shape == (40, sum(n for _, _, n in LABEL_HEADS))
    assert set(languages) == set(LANGUAGES) and set(kinds) == set(KINDS)
    two_pairs = labels[:, :len(PAIRS)].gt(0).sum(1) == 2  # the count heads name two (colour, shape) pairs ...
    assert all(two_pairs[i] == (k in ("two", "relation")) for i, k in enumerate(kinds))  # ... for two-object scenes


def test_kind_weights_set_the_scene_mix_of_training_captions():
    *_, kinds = caption_batch(0, 5, 200, kind_weights=[0, 0, 1, 0])
    assert set(kinds) == {"relation"}
    *_, kinds = caption_batch(0, 5, 400, kind_weights=[1, 0, 3, 0])
    assert set(kinds) == {"single", "relation"} and 0.65 < kinds.count("relation") / 400 < 0.85
    for bad in ([1, 1, 1], [1, -1, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(ValueError, match="kind_weights"):
            TextTrainConfig(kind_weights=bad)


def test_filler_words_are_made_up_and_leave_the_content_words_whole():
    plain, labels, *_ = caption_batch(0, 3, 60)
    noisy, noisy_labels, *_ = caption_batch(0, 3, 60, filler=1.0)
    assert torch.equal(labels[:1], noisy_labels[:1])  # the first caption is drawn before any filler randomness
    assert plain[0] != noisy[0]
    for lang, text in [("en", "a small red circle above a blue star"),
                       ("ru", "маленький красный круг над синей звездой"),
                       ("zh", "一个红色的小圆形在蓝色的五角星的上方")]:
        for seed in range(20):
            out = with_filler(text, lang, np.random.default_rng(seed), words=3)
            added = [w for w in out.split() if w not in text.split()] if lang != "zh" else None
            if lang == "zh":  # every vocabulary word survives unsplit, in order
                for word in ("红色", "圆形", "蓝色", "五角星", "上方"):
                    assert word in out, (word, out)
                assert len(out) > len(text)
            else:
                assert len(added) == 3 and not set(added) & set(text.split()), out
                assert [w for w in out.split() if w in text.split()] == text.split()


def test_a_fact_scores_its_best_visible_token():
    readout = FactTokenReadout(4)
    embeds = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    per_token = readout.linear(embeds)
    scores = readout(embeds, mask)
    assert torch.allclose(scores[0], per_token[0, :3].amax(0)) and torch.allclose(scores[1], per_token[1].amax(0))
    embeds[0, 3:] = 1e4  # padding can say anything: it never lights a fact
    assert torch.equal(readout(embeds, mask)[0], scores[0])


def test_facts_bind_count_size_and_side_to_each_pair():
    def scene(*objects, relation=None):
        return Scene([Obj(shape, color, size, (0, 0, 0.1, 0.1)) for color, shape, size in objects], "default",
                     relation, "relation" if relation else "two")

    def facts(s, sized=True):  # (pair, fact name) for every fact stated
        grid = named_facts(torch.tensor([caption_labels(s, sized)])).view(len(PAIRS), FACTS_PER_PAIR)
        names = ["1", "2", "3", *SIZES, *RELATIONS]
        return {(PAIRS[p], names[f]) for p, f in grid.nonzero().tolist()}

    red, blue = ("red", "circle"), ("blue", "square")
    # "a blue square right of a small red circle": the red circle (lower-numbered pair) is the left one
    assert facts(scene(("blue", "square", "large"), ("red", "circle", "small"), relation="right of")) == {
        (red, "1"), (red, "small"), (red, "left of"), (blue, "1"), (blue, "large"), (blue, "right of")}
    assert facts(scene(("red", "circle", "large"), ("blue", "square", "small"), relation="below"), sized=False) == {
        (red, "1"), (red, "below"), (blue, "1"), (blue, "above")}
    assert facts(scene(*[("red", "circle", "small")] * 3)) == {(red, "3"), (red, "small")}
    _, labels, _, kinds = caption_batch(0, 1, 40)
    sides = named_facts(labels).view(len(labels), len(PAIRS), FACTS_PER_PAIR)[..., -len(RELATIONS):]
    assert [int(n) for n in sides.sum((1, 2))] == [2 if k == "relation" else 0 for k in kinds]


def test_span_targets_give_each_token_the_facts_of_the_object_most_of_its_bytes_name():
    red, blue = (3, 1, 1, 1), (7, 0, 1, 2)  # (pair, size, count, side) of objects 0 and 1
    text = "xxxxAAAAyyBBBBBB"  # one token of template words, one of A, one split 2:2 (-> B), one of B
    owners = [-1] * 4 + [0] * 4 + [-1] * 2 + [1] * 6
    none = [len(PAIRS), -100, -100, -100]
    targets = span_targets([text], [owners], [[red, blue]], pool=4, max_length=64, tokens=6)
    assert targets[0].tolist() == [none, list(red), list(blue), list(blue), none, [-100] * 4]  # ..., EOS, past it
    # bytes, not characters: a Chinese character is 3 bytes; truncation keeps max_length - 1 bytes and the EOS
    targets = span_targets(["红红x"], [[0, 0, -1]], [[red]], pool=4, max_length=5, tokens=2)
    assert targets[0].tolist() == [list(red), none]  # bytes 0-3, then the EOS alone


def test_caption_spans_name_each_relation_object_with_its_own_side():
    texts, labels, _, kinds, spans = caption_batch(0, 2, 60, spans=True)
    for text, kind, (owners, facts) in zip(texts, kinds, spans):
        assert len(owners) == len(text) and set(owners) - {-1} == set(range(len(facts)))
        assert len(facts) == (2 if kind in ("two", "relation") else 1)
        sides = [f[3] for f in facts]
        if kind == "relation":  # one object's side is the other's inverse
            assert RELATIONS[sides[1] - 1] == INVERSE[RELATIONS[sides[0] - 1]]
        else:
            assert sides == [0] * len(facts)
    with pytest.raises(ValueError, match="filler"):
        caption_batch(0, 2, 4, filler=0.5, spans=True)


def test_the_encoder_learns_the_labels_and_is_saved_as_a_loadable_folder(tmp_path):
    cfg = TextTrainConfig(encoder={"width": 32, "depth": 1, "heads": 2, "max_length": 96, "pool": 2}, steps=120,
                          batch_size=32, lr=3e-3, warmup=10, log_every=10, eval_captions=30, fact_tokens=0.5,
                          span_tokens=0.5)
    folder = train_text_encoder(cfg, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]  # well below the start (chance on every head)
    report = json.loads((tmp_path / "report.json").read_text())["held_out"]
    assert {"all_correct", "count", "relation", *LANGUAGES} <= set(report) and set(report["by_scene"]) == set(KINDS)
    assert report["background"] > 0.5  # the easiest head: one word
    assert set(report["fact_tokens_by_scene"]) == set(KINDS)
    assert set(report["fact_tokens_by_kind"]) == set(FACT_KINDS)
    assert 0.0 <= report["seen_templates"] <= 1.0
    assert set(report["span_tokens"]) == {name for name, _ in SPAN_HEADS} | {"relation_sides"}
    assert all(0.0 <= v <= 1.0 for v in report["span_tokens"].values())
    encoder = load_text_encoder(folder)
    assert isinstance(encoder, ByteTextEncoder) and encoder.config.pool == 2


@pytest.mark.parametrize("settings, field", [({"filler": 1.5}, "filler"), ({"fact_tokens": -0.1}, "fact_tokens"),
                                             ({"span_tokens": -1.0}, "span_tokens"),
                                             ({"span_tokens": 0.5, "filler": 0.2}, "span_tokens")])
def test_bad_text_stage_settings_are_refused_by_name(settings, field):
    with pytest.raises(ValueError, match=field):
        TextTrainConfig(**settings)
