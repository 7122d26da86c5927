"""Step caching for DiT sampling: skip most of the transformer on calls whose input has barely changed.

Both methods reuse a residual saved at the last full pass:
- "fbc" (First Block Cache): run the first double block; when its image-stream residual differs from the one seen
  at the last full pass by less than `threshold` (relative mean absolute change), add the residual the remaining
  blocks produced then instead of running them. A skipped call costs one block.
- "teacache": sum the relative change of the first block's modulated image input from call to call; while the sum
  stays under `threshold`, reuse the whole stack's residual (a skipped call costs only the embeddings). A full
  pass resets the sum. TeaCache's published per-model rescaling polynomials are fitted to Flux; here the raw
  change is summed, so thresholds are the model's own (see benchmarks/caching.py).
One StepCache serves one sampling run; a change of batch or size (e.g. a guidance interval dropping the
unconditional half) forces a full pass. `max_skips` caps consecutive reuses (a drift bound); the sampler clears
`allow_skip` for calls that must run in full (the first steps, where the composition is decided). `window`
(windowed attention) passes through to the blocks.
"""

from __future__ import annotations

from torch import Tensor

from .transformer import modulate

METHODS = ("fbc", "teacache")


def relative_change(new: Tensor, old: Tensor) -> float:
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


class StepCache:
    def __init__(self, method: str = "fbc", threshold: float = 0.1, max_skips: int | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown step cache {method!r}; valid: {', '.join(METHODS)}")
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        if max_skips is not None and max_skips < 1:
            raise ValueError(f"cache max_skips must be >= 1 (leave it unset for no cap), got {max_skips}")
        self.method, self.threshold, self.max_skips = method, threshold, max_skips
        self.allow_skip = True
        self.calls = self.full_passes = self.skips_in_a_row = 0
        self.reference: Tensor | None = None  # fbc: probe at the last full pass; teacache: probe of the last call
        self.residual: Tensor | None = None
        self.accumulated = 0.0

    def stats(self) -> dict:
        return {"method": self.method, "threshold": self.threshold, **({"max_skips": self.max_skips}
                if self.max_skips else {}), "calls": self.calls, "full_passes": self.full_passes}

    def __call__(self, model, img: Tensor, txt: Tensor, mods, pe: Tensor, key_mask: Tensor | None,
                 window=None) -> Tensor:
        """The image stream after every block, computed or reconstructed from the cached residual."""
        self.calls += 1
        if self.method == "fbc":
            img_mod, txt_mod = mods.double[0]
            first_img, first_txt = model.double_blocks[0](img, txt, img_mod, txt_mod, pe, key_mask, window)
            probe = first_img - img
            if self._usable(probe) and relative_change(probe, self.reference) < self.threshold:
                return self._skipped(first_img + self.residual)
            out = model.blocks(first_img, first_txt, mods, pe, key_mask, start=1, window=window)
            self.reference, self.residual = probe, out - first_img
        else:
            block, img_mod = model.double_blocks[0], mods.double[0][0]
            probe = modulate(block.img_norm1(img), img_mod[:, 0], img_mod[:, 1])  # the block's modulated input
            usable = self._usable(probe)
            if usable:
                self.accumulated += relative_change(probe, self.reference)
            self.reference = probe
            if usable and self.accumulated < self.threshold:
                return self._skipped(img + self.residual)
            out = model.blocks(img, txt, mods, pe, key_mask, window=window)
            self.residual, self.accumulated = out - img, 0.0
        self.full_passes += 1
        self.skips_in_a_row = 0
        return out

    def _usable(self, probe: Tensor) -> bool:
        """A reuse is allowed (by the sampler and the skip cap) and the saved tensors fit this call."""
        return (self.allow_skip and (self.max_skips is None or self.skips_in_a_row < self.max_skips)
                and self.residual is not None and self.reference is not None and self.reference.shape == probe.shape)

    def _skipped(self, out: Tensor) -> Tensor:
        self.skips_in_a_row += 1
        return out
