"""Multi-process training: DDP or FSDP, collective decisions, and unsharded state for checkpoints.

Under torchrun every rank runs the same loop. DDP replicates the model on each rank; FSDP (torch's `fully_shard`)
splits weights, gradients and optimizer state across ranks block by block, for models that do not fit one device.
Checkpoints are always written unsharded by rank 0, so a run resumes under either strategy and any process count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

STRATEGIES = ("ddp", "fsdp")


def shard(model: nn.Module) -> None:
    """FSDP-wrap each transformer block (one all-gather per block), the text encoder if it trains, then the root."""
    from torch.distributed.fsdp import fully_shard
    for block in [*model.transformer.double_blocks, *model.transformer.single_blocks]:
        fully_shard(block)
    if hasattr(model, "text_encoder"):
        fully_shard(model.text_encoder)
    fully_shard(model)


def agree(*flags: bool) -> list[bool]:
    """The same decisions on every rank (any rank's True wins): saving and stopping are collective steps."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t]


def full_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sharded (DTensor) entries gathered whole; a collective when any entry is sharded: every rank calls it."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def like(full: Tensor, reference: Tensor) -> Tensor:
    """`full` laid out as `reference`: this rank's shard of it when `reference` is sharded."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements,
                                 src_data_rank=None)
    return full
