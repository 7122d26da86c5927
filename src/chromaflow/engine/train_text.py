"""Pretrain the built-in byte-level text encoder on what the shapes world's captions say.

Real Chroma reads prompts through a frozen, pretrained T5; the built-in model gets the same arrangement at toy
scale. Each caption's content (count and named size of every colour-shape pair, the relation, the background:
`shapes.caption_labels`) is a set of class labels that no language, template or word order changes. The encoder's
tokens, averaged over the caption, must predict them through one linear layer, so the tokens the DiT attends to
carry the content linearly, with colours bound to their shapes, and say the same thing in en / zh / ru.
The average cannot bind on its own ("a red square and a blue circle" averages like "a red circle and a blue
square"), so `fact_tokens` > 0 adds a per-token readout: every token scores every fact a caption can state about a
colour-shape pair (its count, its named size, its side in a relation), a fact's score is the best token's, and it
must say which facts the caption states. Then some single token has to hold each conjunction ("the red circle is
the left one"), which is what the DiT's attention can read: an image token on the left finds the token that says
what belongs there. That max readout never learned which object a relation puts on which side; `span_tokens` > 0
adds a dense target that did: every token states the facts of the object its bytes name (its pair, named size,
count and side; the captioner records which object each character names), so the tokens of "a red circle" in
"a red circle left of a blue star" must say "left".
(Trained only through the diffusion loss, the encoder collapsed to a caption-independent output, or stayed too
weak for the DiT to tell "a red circle" from "a blue square".)

Captions of step s come from a generator seeded by (seed, s); the stage takes minutes, so an interrupted one starts
over rather than resuming. Held-out captions (the benchmark's unseen templates) measure the result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..formats.checkpoint import atomic_write
from ..models.precision import bf16_autocast
from ..models.text import ByteTextEncoder, ByteTextEncoderConfig
from .shapes import (INVERSE, KINDS, LABEL_HEADS, LANGUAGES, PAIRS, RELATIONS, SIZES, caption, caption_labels,
                     sample_scene, with_filler)

HELD_OUT_SEED = 2_000_003  # captions for the report: a stream training never draws from


@dataclass
class TextTrainConfig:
    encoder: dict = field(default_factory=dict)  # ByteTextEncoderConfig fields
    steps: int = 2000
    batch_size: int = 128
    filler: float = 0.0  # share of training captions with 1-3 made-up words inserted (shapes.with_filler)
    fact_tokens: float = 0.0  # weight of the per-token fact readout's loss (FactTokenReadout); 0 = off
    kind_weights: list | None = None  # training captions' scene-kind mix over shapes.KINDS; None = the world's own
    span_tokens: float = 0.0  # weight of the per-token span readout's loss (SpanTokenReadout); 0 = off
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_captions: int = 600
    log_every: int = 50
    device: str = ""  # "" = cuda when available, else cpu

    def __post_init__(self):
        if not 0.0 <= self.filler <= 1.0:
            raise ValueError(f"text stage `filler` is a share of captions, 0..1; got {self.filler}")
        if self.fact_tokens < 0:
            raise ValueError(f"text stage `fact_tokens` is a loss weight, >= 0 (0 = off); got {self.fact_tokens}")
        if self.span_tokens < 0 or (self.span_tokens and self.filler):
            raise ValueError(f"text stage `span_tokens` is a loss weight, >= 0 (0 = off), and needs `filler` 0 (made-up "
                             f"words would shift the spans); got span_tokens {self.span_tokens}, filler {self.filler}")
        if self.kind_weights is not None and (len(self.kind_weights) != len(KINDS) or min(self.kind_weights) < 0
                                              or sum(self.kind_weights) <= 0):
            raise ValueError(f"text stage `kind_weights`: {len(KINDS)} non-negative weights for {', '.join(KINDS)}, "
                             f"not all 0; got {self.kind_weights}")


class LabelReadout(nn.Module):
    """Mean of the visible tokens -> one linear layer -> logits for every head of LABEL_HEADS."""

    def __init__(self, dim: int):
        super().__init__()
        self.sizes = [classes for _, classes, n in LABEL_HEADS for _ in range(n)]
        self.linear = nn.Linear(dim, sum(self.sizes))

    def forward(self, embeds: Tensor, mask: Tensor) -> list[Tensor]:
        m = mask[..., None].to(embeds.dtype)
        pooled = (embeds * m).sum(1) / m.sum(1).clamp(min=1)
        return list(self.linear(pooled).split(self.sizes, dim=-1))


# per (colour, shape) pair, the facts a caption can state about it, by kind: each non-zero class of its count and
# size labels (count 1-3, a named size), and its side in a relation
_CLASSES = {name: classes for name, classes, _ in LABEL_HEADS}
FACT_KINDS = {"count": _CLASSES["count"] - 1, "size": _CLASSES["size"] - 1, "side": len(RELATIONS)}
FACTS_PER_PAIR = sum(FACT_KINDS.values())
_INVERSE_SIDE = torch.tensor([RELATIONS.index(INVERSE[r]) for r in RELATIONS])  # relation index -> its inverse's


class FactTokenReadout(nn.Module):
    """Per token, one logit per fact (pairs x FACTS_PER_PAIR); a caption's logit for a fact is its best visible
    token's."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, len(PAIRS) * FACTS_PER_PAIR)

    def forward(self, embeds: Tensor, mask: Tensor) -> Tensor:
        return self.linear(embeds).masked_fill(~mask[..., None], float("-inf")).amax(1)  # (B, facts)


def named_facts(labels: Tensor) -> Tensor:
    """(B, heads) caption labels -> (B, pairs x FACTS_PER_PAIR) bool: the facts the caption states. A relation
    "A left of B" gives A the side "left of" and B "right of" (caption_labels keeps it for the lower-numbered pair)."""
    n = len(PAIRS)
    count, size, relation = labels[:, :n], labels[:, n:2 * n], labels[:, 2 * n]
    counts = count[..., None] == torch.arange(1, 1 + FACT_KINDS["count"])            # (B, pairs, 3)
    sizes = size[..., None] == torch.arange(1, 1 + FACT_KINDS["size"])                # (B, pairs, sizes)
    sides = torch.zeros(len(labels), n, len(RELATIONS), dtype=torch.bool)
    rows = (relation > 0).nonzero().flatten()
    named = count[rows] > 0
    first = named.int().argmax(1)                          # the lower-numbered pair and the other (the same pair
    last = n - 1 - named.flip(1).int().argmax(1)           # twice when both objects are alike)
    rel = relation[rows] - 1
    sides[rows, first, rel] = True
    sides[rows, last, _INVERSE_SIDE[rel]] = True
    return torch.cat([counts, sizes, sides], -1).flatten(1)


# per token of an object's phrase: which (colour, shape) pair it names (or none: a token of the template's own
# words), and that object's named size, count and side in a relation (none + RELATIONS)
SPAN_HEADS = (("pair", len(PAIRS) + 1), ("size", _CLASSES["size"]), ("count", _CLASSES["count"]),
              ("side", 1 + len(RELATIONS)))


class SpanTokenReadout(nn.Module):
    """Per token, logits for every head of SPAN_HEADS: one linear layer, so each token must carry its object's
    facts itself, the side in a relation included, where the DiT's attention reads them."""

    def __init__(self, dim: int):
        super().__init__()
        self.sizes = [classes for _, classes in SPAN_HEADS]
        self.linear = nn.Linear(dim, sum(self.sizes))

    def forward(self, embeds: Tensor) -> list[Tensor]:
        return list(self.linear(embeds).split(self.sizes, dim=-1))


def object_facts(scene, sized: bool) -> list[tuple[int, int, int, int]]:
    """Per object a caption names (shapes.slot_owner 0, 1; a count scene's group is one): what every token of its
    phrase states, as classes of SPAN_HEADS (pair, named size, count, side)."""
    named = scene.objects[:1] if scene.kind == "count" else scene.objects
    facts = []
    for k, o in enumerate(named):
        side = 0 if not scene.relation else 1 + RELATIONS.index(scene.relation if k == 0 else INVERSE[scene.relation])
        facts.append((PAIRS.index((o.color, o.shape)), 1 + list(SIZES).index(o.size) if sized else 0,
                      len(scene.objects) if scene.kind == "count" else 1, side))
    return facts


def span_targets(texts: list[str], owners: list[list[int]], facts: list[list[tuple]], pool: int, max_length: int,
                 tokens: int) -> Tensor:
    """(B, tokens, heads) long targets for SpanTokenReadout. An encoder token covers `pool` bytes (ByteTokenizer:
    at most max_length - 1 bytes, then EOS); it speaks for the object most of its bytes name, a tie going to the
    object. Tokens of no object: pair class "none", the other heads ignored (-100); tokens past the caption: -100."""
    out = torch.full((len(texts), tokens, len(SPAN_HEADS)), -100, dtype=torch.long)
    for i, (text, owner, fact) in enumerate(zip(texts, owners, facts)):
        byte_owner = [o for ch, o in zip(text, owner) for _ in ch.encode("utf-8")][: max_length - 1] + [-1]
        for j in range(min(tokens, -(-len(byte_owner) // pool))):
            group = byte_owner[j * pool:(j + 1) * pool]
            k = max((-1, 0, 1), key=lambda o: (group.count(o), o >= 0))
            out[i, j] = torch.tensor(fact[k]) if k >= 0 else torch.tensor([len(PAIRS), -100, -100, -100])
    return out


def span_loss(logits: list[Tensor], targets: Tensor) -> Tensor:
    return sum(F.cross_entropy(lg.flatten(0, 1).float(), targets[..., h].flatten(), ignore_index=-100)
               for h, lg in enumerate(logits)) / len(logits)


def caption_batch(seed: int, step: int, n: int, split: str = "train", filler: float = 0.0, kind_weights=None,
                  spans: bool = False) -> tuple:
    """n captions of random scenes in random languages -> (texts, labels (n, heads) long, languages, scene kinds);
    a `filler` share of them with made-up words inserted; `kind_weights` over KINDS (None: the world's mix).
    spans: a fifth item, per caption (owners, object_facts): which object each character names, and their facts."""
    if spans and filler:
        raise ValueError("caption spans are not tracked through filler words")
    rng = np.random.default_rng([seed, step])
    texts, labels, languages, kinds, span_info = [], [], [], [], []
    for _ in range(n):
        scene = sample_scene(rng, kind_weights=kind_weights)
        text, language, sized, owners = caption(scene, rng, split=split, with_sized=True, with_owners=True)
        if filler and rng.random() < filler:
            text = with_filler(text, language, rng)
        texts.append(text)
        labels.append(caption_labels(scene, sized))
        languages.append(language)
        kinds.append(scene.kind)
        if spans:
            span_info.append((owners, object_facts(scene, sized)))
    return (texts, torch.tensor(labels), languages, kinds) + ((span_info,) if spans else ())


def label_loss(logits: list[Tensor], labels: Tensor) -> Tensor:
    return sum(F.cross_entropy(lg.float(), labels[:, i]) for i, lg in enumerate(logits)) / len(logits)


@torch.no_grad()
def evaluate(encoder: ByteTextEncoder, readout: LabelReadout, n: int, seed: int,
             fact_readout: FactTokenReadout | None = None, span_readout: SpanTokenReadout | None = None) -> dict:
    """Share of held-out captions (half from templates training never used) with every label right, by language
    and by scene kind (`by_scene`: two-object captions show whether colours are bound to their shapes); with
    `fact_readout`, `fact_tokens_by_scene`: share whose stated facts its tokens get exactly right; with
    `span_readout`, `span_tokens` (span_report); `seen_templates`: all-correct share of held-out scenes worded only
    with training templates."""
    def predict(texts):
        enc = encoder.encode(texts)
        return enc, torch.stack([lg.argmax(-1) for lg in readout(enc.embeds, enc.mask)], 1).cpu()

    texts, labels, languages, kinds, spans = caption_batch(seed + HELD_OUT_SEED, 0, n, split="eval", spans=True)
    enc, pred = predict(texts)
    right = (pred == labels).all(1)
    report = {"n": n, "all_correct": right.float().mean().item()}
    start = 0
    for name, _, heads in LABEL_HEADS:  # per kind: share of captions with all of that kind's heads right
        report[name] = (pred == labels)[:, start:start + heads].all(1).float().mean().item()
        start += heads

    def share_right(ok: Tensor, tags: list[str], values) -> dict:  # share of `ok` among captions tagged with each
        return {v: ok[torch.tensor([t == v for t in tags])].float().mean().item() for v in values if v in tags}

    report = {**report, **share_right(right, languages, LANGUAGES), "by_scene": share_right(right, kinds, KINDS)}
    if fact_readout is not None:
        stated = (fact_readout(enc.embeds, enc.mask) > 0).cpu()
        facts_right = (stated == named_facts(labels)).view(n, len(PAIRS), -1)
        report["fact_tokens_by_scene"] = share_right(facts_right.flatten(1).all(1), kinds, KINDS)
        # per kind of fact, the share of captions with that kind right for every pair
        kinds_right = facts_right.split(list(FACT_KINDS.values()), -1)
        report["fact_tokens_by_kind"] = {k: r.flatten(1).all(1).float().mean().item()
                                         for k, r in zip(FACT_KINDS, kinds_right)}
    if span_readout is not None:
        report["span_tokens"] = span_report(encoder, span_readout, enc, texts, spans, kinds)
    # held-out scenes worded only with training templates: the gap to all_correct is what unseen wording costs
    texts, labels, *_ = caption_batch(seed + HELD_OUT_SEED, 0, n, split="train")
    report["seen_templates"] = (predict(texts)[1] == labels).all(1).float().mean().item()
    return report


def span_report(encoder: ByteTextEncoder, span_readout: SpanTokenReadout, enc, texts: list[str], spans: list,
                kinds: list[str]) -> dict:
    """Per head of SPAN_HEADS, the share of tokens right (those it scores); `relation_sides`: the share of relation
    captions in which both objects' tokens, by majority, name the object's side correctly."""
    targets = span_targets(texts, *zip(*spans), encoder.config.pool, encoder.max_length, enc.mask.shape[1])
    predicted = torch.stack([lg.argmax(-1) for lg in span_readout(enc.embeds)], -1).cpu()
    scored = targets >= 0
    report = {name: (predicted == targets)[..., h][scored[..., h]].float().mean().item()
              for h, (name, _) in enumerate(SPAN_HEADS)}
    side, both = len(SPAN_HEADS) - 1, []
    pairs = targets[..., 0]
    for i in (i for i, kind in enumerate(kinds) if kind == "relation"):
        objects = [pairs[i] == pair for pair, *_ in spans[i][1]]  # each object's tokens (two distinct pairs)
        both.append(all(bool(m.any()) and predicted[i, m, side].mode().values.item() == targets[i, m, side][0].item()
                        for m in objects))
    report["relation_sides"] = sum(both) / max(1, len(both))
    return report


def train_text_encoder(cfg: TextTrainConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train, then save the encoder to out_dir/text_encoder (written last: its presence means done) with a report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    encoder = ByteTextEncoder(ByteTextEncoderConfig(**cfg.encoder)).to(device).train()
    readout = LabelReadout(encoder.out_dim).to(device)
    fact_readout = FactTokenReadout(encoder.out_dim).to(device) if cfg.fact_tokens else None
    span_readout = SpanTokenReadout(encoder.out_dim).to(device) if cfg.span_tokens else None
    params = [p for m in (encoder, readout, fact_readout, span_readout) if m is not None for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    started = time.time()
    bar = tqdm(range(cfg.steps), desc="text encoder", disable=not progress)
    with atomic_write(out / "metrics.jsonl", "w") as log:
        for step in bar:
            batch = caption_batch(cfg.seed, step, cfg.batch_size, filler=cfg.filler, kind_weights=cfg.kind_weights,
                                  spans=span_readout is not None)
            texts, labels = batch[:2]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with bf16_autocast(device):
                enc = encoder.encode(texts)
                loss = label_loss(readout(enc.embeds, enc.mask), labels.to(device))
                if fact_readout is not None:
                    loss = loss + cfg.fact_tokens * F.binary_cross_entropy_with_logits(
                        fact_readout(enc.embeds, enc.mask).float(), named_facts(labels).float().to(device))
                if span_readout is not None:
                    targets = span_targets(texts, *zip(*batch[4]), encoder.config.pool, encoder.max_length,
                                           enc.mask.shape[1])
                    loss = loss + cfg.span_tokens * span_loss(span_readout(enc.embeds), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                log.write(json.dumps({"step": step, "loss": loss.item(), "elapsed_s": time.time() - started}) + "\n")
    encoder.eval()
    report = {"config": asdict(cfg), "held_out": evaluate(encoder, readout, cfg.eval_captions, cfg.seed, fact_readout,
                                                          span_readout),
              "elapsed_s": time.time() - started}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    encoder.cpu().save(out / "text_encoder")
    return out / "text_encoder"
