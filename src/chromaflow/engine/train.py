"""The rectified-flow trainer: one readable loop that trains the built-in model and fine-tunes real Chroma.

Each step: draw a batch (deterministic by its position), encode images to latents, pair them with noise by
minibatch OT, sample t from the configured density, regress the velocity eps - x0. Everything random in a step
comes from a generator seeded by (seed, step, micro-batch, rank), so a resumed run replays the same numbers:
the checkpoint holds only weights, EMA, optimizer moments and the step counter.

With `lora` set, the transformer (loaded from `base`) is frozen and only low-rank adapters train; checkpoints and
the EMA then hold just the adapters, and the finished run is exported as kohya and diffusers LoRA files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import BUILTIN_DIR
from ..formats.checkpoint import atomic_write, open_checkpoint, save_checkpoint, stop_on_signals
from .distributed import STRATEGIES, agree, full_tensors, like, shard
from ..models.lora import DEFAULT_TARGETS, add_lora
from ..models.precision import bf16_autocast
from ..models.quant import is_quantized
from ..models.text import ByteTextEncoder, ByteTextEncoderConfig, chroma_mask, load_text_encoder
from ..models.transformer import MMDiT, MMDiTParams, build, image_ids, init_adaln_zero, preset
from ..models.vae import VAE, pack
from .shapes import GAP, SHAPES, ShapesDataset
from . import flow
from .report import loss_curve


# the TrainConfig fields that shape the flow loss, which a stage may set for its own steps
STAGE_LOSS_FIELDS = ("timesteps", "logit_mean", "logit_std", "mode_scale", "timestep_shift", "ot_pairing",
                     "caption_dropout", "contrastive_weight")
# the shapes world's settings a stage may set for its own steps (a curriculum over scene layouts and kinds)
STAGE_DATA_FIELDS = ("gap", "kind_weights")


@dataclass
class Stage:
    """`steps` steps at square `size` px with `batch_size` per process and micro-batch. A list of sizes (and batch
    sizes) cycles step by step, so a stage can mix resolutions: [128, 128, 128, 256] is 3:1. `loss` replaces
    flow-loss settings of the config for this stage's steps, e.g. {"timestep_shift": 3.0, "ot_pairing": false};
    `data` replaces settings of the shapes world, e.g. {"gap": 0.12} (objects further apart)."""
    steps: int
    size: int | list
    batch_size: int | list
    loss: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, valid, what in (("loss", STAGE_LOSS_FIELDS, "flow-loss"),
                                 ("data", STAGE_DATA_FIELDS, "shapes-world")):
            unknown = sorted(set(getattr(self, key)) - set(valid))
            if unknown:
                raise ValueError(f"stage `{key}` keys {unknown} are not {what} settings; valid: {', '.join(valid)}")
        sizes = self.size if isinstance(self.size, list) else [self.size]
        batches = self.batch_size if isinstance(self.batch_size, list) else [self.batch_size]
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"stage `steps` must be a positive integer, got {self.steps!r}")
        if not sizes or any(not isinstance(v, int) or v < 16 or v % 16 for v in sizes):
            raise ValueError(f"stage `size` must be a positive multiple of 16 pixels (or a list of them), "
                             f"got {self.size!r}")
        if not batches or any(not isinstance(v, int) or v < 1 for v in batches):
            raise ValueError(f"stage `batch_size` must be a positive integer (or a list of them), got "
                             f"{self.batch_size!r}")

    def at(self, step: int) -> tuple[int, int]:
        """(size, batch_size) for the stage's step number `step`."""
        sizes = self.size if isinstance(self.size, list) else [self.size]
        batches = self.batch_size if isinstance(self.batch_size, list) else [self.batch_size]
        return sizes[step % len(sizes)], batches[step % len(batches)]


_JSON_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "dict": (dict,),
               "list": (list,), "tuple": (list, tuple)}  # what JSON may hold for a field of each annotation


@dataclass
class TrainConfig:
    name: str = "run"
    model: dict = field(default_factory=lambda: {"preset": "default"})  # preset name + MMDiTParams overrides
    # start from trained weights: a model folder (model.json; also supplies text encoder and VAE unless given),
    # a transformer checkpoint, or "builtin" (the shipped model)
    base: str = ""
    # from scratch: "default" (PyTorch's layer init) or "adaln_zero" (DiT's: blocks start as the identity)
    init: str = "default"
    # train a LoRA on the frozen base instead of the whole model: rank, alpha (default rank), targets (fnmatch
    # patterns over Linear names, default every block Linear), save (layouts written at the end)
    lora: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)  # ByteTextEncoderConfig fields, or {"path": T5 folder}
    train_text_encoder: bool = True
    # a text encoder trained from scratch first stays frozen (its random features are diverse) while the DiT learns
    # to read them, then trains at text_encoder_lr * lr: from the start, it collapses to a caption-independent output
    text_encoder_frozen_steps: int = 0
    text_encoder_lr: float = 1.0
    vae: str = ""  # VAE folder
    data: dict = field(default_factory=lambda: {"kind": "shapes", "seed": 0})
    stages: list = field(default_factory=lambda: [{"steps": 1000, "size": 256, "batch_size": 32}])
    grad_accum: int = 1
    timesteps: str = "chroma"  # uniform | logit_normal | mode | chroma
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    timestep_shift: float | str | None = None  # number, "flux" (resolution-dependent) or None
    ot_pairing: bool = True
    # REPA-style auxiliary loss, for data with per-pixel label maps (the shapes world: which shape covers each
    # pixel): {"weight": w (0.5), "block": k (2)}: a small head reads the image tokens after block k (double blocks
    # first, counted from 1) and predicts the labels of each latent pixel, so the early blocks must represent object
    # geometry; the loss adds w * cross-entropy. The head trains with the model and is left out of the export.
    label_loss: dict = field(default_factory=dict)
    caption_dropout: float = 0.1  # empty caption, so the model learns the unconditional velocity for CFG
    # contrastive flow matching (Stoica et al. 2025, "Delta-FM"): subtract w * |prediction - another sample's
    # target|^2 for captioned samples, pushing each caption's flow away from the others' (their paper: w = 0.05);
    # the logged loss then includes that negative term
    contrastive_weight: float = 0.0
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, 8-bit moments: 4x less optimizer memory)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # under torchrun: ddp (replicated) | fsdp (weights, gradients and optimizer state sharded across ranks)
    parallel: str = "ddp"
    device: str = ""  # "" picks cuda (this rank's GPU under torchrun) when there is one, else cpu
    # processes rendering batches ahead; -1: none on a CPU (its cores train), 8 beside a GPU (whose steps outrun one
    # core's rendering). Batches depend only on their position, so any count gives the same run.
    data_workers: int = -1
    bf16: bool = True  # bf16 autocast where the device has native bf16 matmuls (models.precision), else fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 1
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    defaults: dict = field(default_factory=lambda: {"width": 256, "height": 256, "steps": 20, "cfg": 4.0})

    def __post_init__(self):
        if self.label_loss:
            unknown = sorted(set(self.label_loss) - {"weight", "block"})
            if unknown:
                raise ValueError(f"label_loss keys {unknown} are unknown; valid: weight, block")
            self.label_loss = {"weight": 0.5, "block": 2, **self.label_loss}

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stage_list)

    @property
    def stage_list(self) -> list[Stage]:
        return [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]

    def stage_at(self, step: int) -> tuple[Stage, int]:
        """The stage of global step `step` and the step's number within it."""
        start = 0
        for stage in self.stage_list:
            if step < start + stage.steps:
                return stage, step - start
            start += stage.steps
        return self.stage_list[-1], step - start

    def shape_at(self, step: int) -> tuple[int, int]:
        """(image size, batch size) of global step `step`."""
        stage, number = self.stage_at(step)
        return stage.at(number)

    def loss_config(self, step: int) -> "TrainConfig":
        """The config with step `step`'s stage `loss` settings applied."""
        overrides = self.stage_at(step)[0].loss
        return replace(self, **overrides) if overrides else self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; valid: {', '.join(sorted(known))}")
        for key, value in d.items():
            wanted = _JSON_TYPES.get(known[key])  # simple annotations only; unions are checked where used
            # (a JSON true is an int to Python: only bool fields take it)
            if wanted and (not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted)):
                raise ValueError(f"training config `{key}` must be {known[key]}, got {value!r}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


# --- models ---------------------------------------------------------------------------------------------------

class FlowModel(nn.Module):
    """Everything that trains, in one module (so DDP syncs it): the transformer and, optionally, the text encoder;
    or, for a LoRA, the adapters (`lora`) hooked into the frozen transformer."""

    def __init__(self, transformer: MMDiT, text_encoder: nn.Module, train_text: bool, lora: dict | None = None,
                 label_loss: dict | None = None):
        super().__init__()
        self.transformer = transformer
        if label_loss:
            self.label_head = LabelHead(transformer, int(label_loss["block"]))
        if lora:
            transformer.requires_grad_(False)
            self.lora, self.lora_hooks = add_lora(transformer, int(lora["rank"]), lora.get("alpha"),
                                                  lora.get("targets", DEFAULT_TARGETS))
            train_text = False  # a LoRA adapts the transformer only
        if train_text:
            self.text_encoder = text_encoder
        else:
            self.frozen_text = [text_encoder.requires_grad_(False)]  # in a list: not a submodule, not trained

    @property
    def text(self):
        return self.text_encoder if hasattr(self, "text_encoder") else self.frozen_text[0]

    def trained_state(self) -> dict[str, Tensor]:
        """What checkpoints and the EMA hold: the whole state, or only the adapters when training a LoRA."""
        if hasattr(self, "lora"):
            return {f"lora.{k}": v for k, v in self.lora.state_dict().items()}
        return self.state_dict()

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        if hasattr(self, "lora"):
            self.lora.load_state_dict({k.removeprefix("lora."): v for k, v in state.items()})
        else:
            self.load_state_dict(state)

    def forward(self, x_t: Tensor, img_ids: Tensor, t: Tensor, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """-> (velocity, label logits (B, L, classes * 4) or None without a label head)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and hasattr(self, "text_encoder")):
            enc = self.text.encode(captions)
        mask = chroma_mask(enc.mask)
        txt_ids = torch.zeros(*mask.shape, 3, device=x_t.device)
        velocity = self.transformer(x_t, img_ids, enc.embeds, txt_ids, t, txt_mask=mask)
        return velocity, (self.label_head.logits(x_t.shape[1]) if hasattr(self, "label_head") else None)


class LabelHead(nn.Module):
    """The label loss's reader: an MLP from the image tokens after one block to per-latent-pixel class logits (4
    latent pixels per 2x2-packed token), the tokens taken by a forward hook so the transformer stays unchanged."""

    def __init__(self, transformer: MMDiT, block: int, classes: int = 1 + len(SHAPES)):
        super().__init__()
        blocks = [*transformer.double_blocks, *transformer.single_blocks]
        if not 1 <= block <= len(blocks):
            raise ValueError(f"label_loss block must be in 1..{len(blocks)} (the transformer's blocks), got {block}")
        h = transformer.params.hidden_size
        self.mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 4 * classes))
        self.features = None
        # a double block returns (img, txt); a single block the joint sequence, image tokens last
        blocks[block - 1].register_forward_hook(
            lambda module, args, out: setattr(self, "features", out[0] if isinstance(out, tuple) else out))

    def logits(self, image_tokens: int) -> Tensor:
        return self.mlp(self.features[:, -image_tokens:].float())


def label_targets(labels: Tensor, classes: int, latent_hw: tuple[int, int]) -> Tensor:
    """(B, H, W) class maps -> (B, L, classes * 4) soft targets laid out like `pack`: the share of each latent
    pixel's area under each class."""
    one_hot = nn.functional.one_hot(labels.long(), classes).permute(0, 3, 1, 2).float()
    return pack(nn.functional.adaptive_avg_pool2d(one_hot, latent_hw))


def base_model_files(base: str) -> tuple[Path, Path | None, Path | None]:
    """(transformer checkpoint, text encoder folder, VAE folder) of a `base`; the folders only for model folders."""
    path = BUILTIN_DIR if base == "builtin" else Path(base).expanduser()
    if path.is_dir() and (path / "model.json").is_file():
        manifest = json.loads((path / "model.json").read_text())
        return (path / manifest.get("transformer", "transformer.safetensors"),
                path / manifest.get("text_encoder", "text_encoder"), path / manifest.get("vae", "vae"))
    if not path.exists():
        raise FileNotFoundError(f"training base {base!r}: no such model folder or checkpoint")
    return path, None, None


def transformer_params(cfg: TrainConfig) -> MMDiTParams:
    """The DiT's shape: a preset with overrides, or every field given."""
    params = dict(cfg.model)
    base = params.pop("preset", "default")
    return preset(base, **params) if isinstance(base, str) else MMDiTParams.from_dict(params)


INITS = ("default", "adaln_zero")  # TrainConfig.init: PyTorch's layer init, or DiT's identity blocks


def build_models(cfg: TrainConfig) -> tuple[MMDiT, nn.Module, VAE]:
    text_path, vae_path = cfg.text_encoder.get("path"), cfg.vae
    if cfg.init not in INITS:
        raise ValueError(f"unknown init {cfg.init!r}; valid: {', '.join(INITS)}")
    if cfg.base:
        from ..formats.layouts import load_transformer
        weights, base_text, base_vae = base_model_files(cfg.base)
        transformer, _ = load_transformer(weights, dtype=torch.float32)
        text_path, vae_path = text_path or base_text, vae_path or base_vae
    else:
        transformer = build(transformer_params(cfg))
        if cfg.init == "adaln_zero":
            init_adaln_zero(transformer)
    if text_path:
        text = load_text_encoder(text_path)
    else:
        text = ByteTextEncoder(ByteTextEncoderConfig(**{"out_dim": transformer.params.context_in_dim,
                                                        **cfg.text_encoder}))
    if not vae_path:
        raise ValueError("the training config needs `vae`: a VAE folder (train one with the `vae` stage first)")
    vae = VAE.load(vae_path).eval().requires_grad_(False)
    packed = 4 * vae.latent_channels  # the transformer reads 2x2 patches of latents
    if (transformer.params.in_channels, transformer.params.out_channels) != (packed, packed):
        raise ValueError(f"the VAE {vae_path} has {vae.latent_channels} latent channels, so the transformer needs "
                         f"in_channels = out_channels = {packed} (set them in the config's `model`); it has "
                         f"{transformer.params.in_channels} / {transformer.params.out_channels}")
    return transformer, text, vae


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (biases, norm scales and other vectors are left alone); the text encoder's
    parameters in groups of their own (`"text": True`) for their learning-rate multiplier."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith("text_encoder."), p.ndim >= 2)
            groups.setdefault(key, []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "text": text}
            for (text, decay), params in sorted(groups.items())]


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'chromaflow[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: adamw, adamw8bit")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant or cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def step_generator(cfg: TrainConfig, step: int, micro: int, rank: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([cfg.seed, step, micro, rank]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


# --- data -----------------------------------------------------------------------------------------------------

def make_data(cfg: TrainConfig, vae: VAE | None = None):
    """The training source: `batch(number, batch_size, size) -> (images (B,3,H,W) in [-1,1], captions)`, or
    (latents, captions) already encoded when it `returns_latents` (a latent cache, which needs the VAE)."""
    kind = cfg.data.get("kind", "shapes")
    if kind == "shapes":
        data = ShapesData(**{k: v for k, v in cfg.data.items() if k != "kind"}, labels=bool(cfg.label_loss))
        for stage in cfg.stage_list:  # a bad stage setting fails now, not hours into the run
            ShapesDataset(**{**data.settings, **stage.data})
        return data
    if any(stage.data for stage in cfg.stage_list):
        raise ValueError(f"stage `data` settings are for the shapes world; this run's data is {kind!r}")
    from .data import make_dataset  # image folders, JSONL manifests, buckets, latent caches
    return make_dataset(cfg.data, vae=vae)


class _PlannedBatches(torch.utils.data.Dataset):
    def __init__(self, data, plan: list[tuple[int, int, int]]):
        self.data, self.plan = data, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        return self.data.batch(*self.plan[i])


def batch_stream(data, plan: list[tuple[int, int, int]], workers: int = 0):
    """The batches of `plan` ((number, batch_size, size) each) in order; with workers, rendered ahead in
    subprocesses."""
    if workers <= 0:
        return (data.batch(*key) for key in plan)
    loader = torch.utils.data.DataLoader(_PlannedBatches(data, plan), batch_size=None, num_workers=workers,
                                         prefetch_factor=4)
    return iter(loader)


class ShapesData:
    """Batches of the shapes world: (images, captions), and each image's shape_labels map with `labels`."""

    def __init__(self, seed: int = 0, languages=("en", "zh", "ru"), language_weights=None, kind_weights=None,
                 centre_jitter: float | None = None, gap: float = GAP, labels: bool = False):
        self.settings = dict(seed=seed, languages=languages, language_weights=language_weights,
                             kind_weights=kind_weights, as_tensor=True, centre_jitter=centre_jitter, gap=gap)
        self.world = ShapesDataset(**self.settings)
        self.stage_worlds: dict[str, ShapesDataset] = {}  # one per stage's settings, built on first use
        self.labels = labels

    def batch(self, number: int, batch_size: int, size: int, stage_settings: dict | None = None) -> tuple:
        """Batch `number`; `stage_settings` (a stage's `data`) replace the world's settings for it."""
        if batch_size > 4096:
            raise ValueError(f"batch_size {batch_size} is over 4096 per process")
        world = self.world
        if stage_settings:
            key = json.dumps(stage_settings, sort_keys=True)
            if key not in self.stage_worlds:
                self.stage_worlds[key] = ShapesDataset(**{**self.settings, **stage_settings})
            world = self.stage_worlds[key]
        world.size = size
        # batch `number` owns the item range [number * 4096, ...): unique even when batch sizes vary by step
        indices = range(number * 4096, number * 4096 + batch_size)
        items = [world[i] for i in indices]
        images, captions = torch.stack([img for img, _ in items]), [cap for _, cap in items]
        if not self.labels:
            return images, captions
        return images, captions, torch.from_numpy(np.stack([world.labels(i) for i in indices]))


# --- checkpoints ----------------------------------------------------------------------------------------------

def save_state(out_dir: Path, step: int, model: FlowModel, ema: dict[str, Tensor], opt: torch.optim.Optimizer,
               extra: dict, keep: int = 1, write: bool = True) -> Path:
    """Write ckpt-STEP/ completely, then point latest.json at it (atomic), then prune older checkpoints. Under FSDP
    every rank calls it (gathering the shards is collective) and only the one with `write` writes."""
    folder = out_dir / f"ckpt-{step:08d}"
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = {}, {}  # optimizer state by parameter name: tensors to safetensors, plain numbers to JSON
    for p, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{names[id(p)]}.{key}"] = value
            else:
                scalars.setdefault(names[id(p)], {})[key] = value
    weights, ema, tensors = (full_tensors(d) for d in (model.trained_state(), ema, tensors))  # save_checkpoint
    # moves each tensor to the CPU as it writes
    if not write:
        return folder
    tmp = out_dir / f".ckpt-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint({k: v.detach() for k, v in weights.items()}, tmp / "model.safetensors")
    save_checkpoint(ema, tmp / "ema.safetensors")
    save_checkpoint(tensors, tmp / "optimizer.safetensors")
    with atomic_write(tmp / "state.json", "w") as f:
        json.dump({"step": step, "optimizer_scalars": scalars, **extra}, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    with atomic_write(out_dir / "latest.json", "w") as f:
        json.dump({"checkpoint": folder.name, "step": step}, f)
    for old in sorted(out_dir.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_state(folder: Path, model: FlowModel, ema: dict[str, Tensor], opt: torch.optim.Optimizer) -> dict:
    def read(name):
        with open_checkpoint(folder / name) as ckpt:
            return {k: ckpt.get(k) for k in ckpt.keys()}
    current = model.trained_state()  # unsharded files laid out like the live tensors (shards under FSDP)
    model.load_trained_state({k: like(v, current[k]) for k, v in read("model.safetensors").items()})
    for k, v in read("ema.safetensors").items():
        ema[k].copy_(like(v, ema[k]))
    state = json.loads((folder / "state.json").read_text())
    per_param: dict[str, dict] = {}
    for key, value in read("optimizer.safetensors").items():
        name, field_name = key.rsplit(".", 1)
        per_param.setdefault(name, {})[field_name] = value
    for name, values in state.get("optimizer_scalars", {}).items():
        per_param.setdefault(name, {}).update(values)
    for name, step in state.get("optimizer_steps", {}).items():  # checkpoints written before optimizer_scalars
        per_param[name]["step"] = torch.tensor(step)
    for name, p in model.named_parameters():
        if name in per_param:
            opt.state[p] = {k: like(v.to(p.device), p) if torch.is_tensor(v) and v.shape == p.shape else v
                            for k, v in per_param[name].items()}
    return state


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "latest.json"
    if not pointer.is_file():
        return None
    return out_dir / json.loads(pointer.read_text())["checkpoint"]


# --- the loop -------------------------------------------------------------------------------------------------

class StopRequested(Exception):
    pass


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = True, progress: bool = True,
          stop_after: int | None = None, preview=None, data=None, time_limit: float | None = None) -> FlowModel:
    """Train to cfg.total_steps (or `stop_after` more steps, or until `time_limit` seconds of this call have passed,
    whichever comes first), checkpointing into out_dir; returns the model, with the EMA weights loaded once training
    is complete. `preview(model, vae, path)` draws sample grids (the pipeline layer provides it; it runs with EMA
    weights every cfg.sample_every steps and at the end). `data` replaces the configured source (anything with
    `batch(number, batch_size, size)`)."""
    out_dir = Path(out_dir)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = training_device(cfg)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = rank == 0
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    transformer, text, vae = build_models(cfg)
    vae.ae.slicing = False  # encode whole batches (one-at-a-time slicing is for reproducible inference)
    vae.to(device, memory_format=torch.channels_last)  # oneDNN's preferred layout for CPU convs
    transformer.to(device)
    text.to(device)
    transformer.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.lora and "rank" not in cfg.lora:
        raise ValueError("the `lora` config needs a rank, e.g. {\"rank\": 16}")
    if cfg.lora and cfg.label_loss:
        raise ValueError("label_loss trains a head beside the whole transformer; it does not combine with `lora`")
    if cfg.lora and not cfg.base:
        raise ValueError("a LoRA trains on trained weights: set `base` (a model folder, checkpoint or \"builtin\")")
    if is_quantized(transformer) and not cfg.lora:
        raise ValueError(f"the base {cfg.base} holds quantized weights, which cannot be trained directly; "
                         "train a LoRA on it (`lora`) or start from a full-precision checkpoint")
    if cfg.parallel not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {cfg.parallel!r}; valid: {', '.join(STRATEGIES)}")
    sharded = distributed and cfg.parallel == "fsdp"
    if sharded and cfg.lora:
        raise ValueError("a LoRA trains with parallel \"ddp\" (its adapters are small); fsdp is for whole models")
    model = FlowModel(transformer, text, cfg.train_text_encoder, cfg.lora, cfg.label_loss).train()
    if sharded:
        shard(model)
    ema = {k: v.detach().clone() for k, v in model.trained_state().items()}
    opt = make_optimizer(cfg, parameter_groups(model, cfg.weight_decay))

    step, wall = 0, 0.0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "config.json", "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_state(ckpt, model, ema, opt)
        step, wall = state["step"], state.get("wall_time", 0.0)
    net = model
    if distributed and not sharded:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = data if data is not None else make_data(cfg, vae)

    # workers forked below inherit the handlers; a signal ends the run at a step boundary, checkpoint saved
    with stop_on_signals() as stop:
        metrics = open(out_dir / "metrics.jsonl", "a") if main else None
        end = cfg.total_steps if stop_after is None else min(cfg.total_steps, step + stop_after)
        # each micro-batch's place in the data: batch `number` is the same whatever the process count or resumption
        # (a stage's shapes-world settings ride along as a fourth item)
        plan = []
        for s in range(step, end):
            stage, number = cfg.stage_at(s)
            size, batch_size = stage.at(number)
            plan += [((s * cfg.grad_accum + micro) * world + rank, batch_size, size, *filter(None, [stage.data]))
                     for micro in range(cfg.grad_accum)]
        workers = cfg.data_workers if cfg.data_workers >= 0 else (8 if device.type == "cuda" else 0)
        batches = batch_stream(data, plan, workers)
        bar = tqdm(total=cfg.total_steps, initial=step, disable=not (progress and main), desc=cfg.name, unit="step")
        last_ckpt_time, started = time.time(), time.time() - wall
        deadline = None if time_limit is None else time.time() + time_limit
        samples_done, rate_start = 0, time.time()
        try:
            while step < end:
                size, batch_size = cfg.shape_at(step)
                lr = lr_at(cfg, step)
                text_lr = 0.0 if step < cfg.text_encoder_frozen_steps else lr * cfg.text_encoder_lr
                for group in opt.param_groups:
                    group["lr"] = text_lr if group["text"] else lr
                loss_sum, label_sum = 0.0, 0.0
                for micro in range(cfg.grad_accum):
                    gen = step_generator(cfg, step, micro, rank)
                    loss, label_ce = flow_loss(net, vae, next(batches), getattr(data, "returns_latents", False),
                                               cfg.loss_config(step), gen)
                    loss = loss / cfg.grad_accum
                    loss.backward()
                    loss_sum += float(loss.detach())
                    label_sum += 0.0 if label_ce is None else float(label_ce) / cfg.grad_accum
                grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                opt.step()
                opt.zero_grad(set_to_none=True)
                update_ema(ema, model, cfg.ema_decay if step >= cfg.warmup_steps else 0.0)
                step += 1
                samples_done += batch_size * cfg.grad_accum * world
                if main:
                    rate = samples_done / max(1e-9, time.time() - rate_start)
                    bar.set_postfix(loss=f"{loss_sum:.4f}", sps=f"{rate:.1f}", size=size)
                    bar.update(1)
                    if step % cfg.log_every == 0 or step == end:
                        metrics.write(json.dumps({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                                                  "samples_per_s": rate, "size": size,
                                                  **({"label_ce": label_sum} if cfg.label_loss else {}),
                                                  "wall_time": time.time() - started}) + "\n")
                        metrics.flush()
                # rank 0's clock and any rank's signal decide for all: saving (and sharded forwards) are collective
                due = step % cfg.checkpoint_every == 0 or time.time() - last_ckpt_time > 60 * cfg.checkpoint_minutes
                out_of_time = deadline is not None and time.time() >= deadline
                due, stopping = agree(main and due, stop["signal"] is not None or out_of_time)
                if due or step == end or stopping:
                    save_state(out_dir, step, model, ema, opt, {"wall_time": time.time() - started},
                               cfg.keep_checkpoints, write=main)
                    last_ckpt_time = time.time()
                if preview and cfg.sample_every and step % cfg.sample_every == 0 and (main or sharded):
                    with ema_weights(model, ema):
                        preview(model, vae, out_dir / f"samples-{step:08d}.png" if main else None)
                if stopping:
                    raise StopRequested
        except StopRequested:
            if main:
                why = f"signal {stop['signal']}" if stop["signal"] else "the time limit" if out_of_time else \
                    "a signal on another rank"
                bar.write(f"stopped by {why} at step {step}; checkpoint saved in {out_dir}")
        finally:
            bar.close()
            if metrics:
                metrics.close()
    if step >= cfg.total_steps:
        model.load_trained_state(ema)
        if sharded:  # hand back a whole model (export and evaluation need every weight)
            weights = full_tensors(model.trained_state())
            torch.manual_seed(cfg.seed)
            model = FlowModel(*build_models(cfg)[:2], cfg.train_text_encoder, cfg.lora, cfg.label_loss).to(device)
            model.load_trained_state(weights)
        if main:
            loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png")
            if cfg.lora:
                export_lora(cfg, model, out_dir)
            if preview:
                preview(model.eval(), vae, out_dir / "samples-final.png")
    if distributed:
        dist.barrier()
    return model


def flow_loss(net: nn.Module, vae: VAE, batch: tuple, latent_batch: bool, cfg: TrainConfig,
              gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """(the step's loss, its label cross-entropy when the model has a label head); `batch` is (images or latents,
    captions) or, for the label loss, (images, captions, label maps)."""
    device = next(net.parameters()).device
    images, captions = batch[:2]
    if latent_batch:
        latents = images.to(device)  # from a latent cache: already encoded
    else:  # in bf16 with the rest where that is fast: 2-3x faster encodes on an AVX-512 BF16 CPU, latents within 0.7%
        with torch.no_grad(), bf16_autocast(device, cfg.bf16):
            latents = vae.encode(images.to(device).contiguous(memory_format=torch.channels_last))
        latents = latents.float().contiguous()
    b, _, h, w = latents.shape
    drop = torch.rand(b, generator=gen) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    noise = torch.randn(latents.shape, generator=gen)  # on the CPU generator: the same numbers on any device
    if cfg.ot_pairing and b > 1:
        noise = flow.ot_pair(latents.cpu(), noise)
    shift = flow.resolution_shift(cfg.timestep_shift, (h // 2) * (w // 2))
    t = flow.sample_timesteps(b, gen, cfg.timesteps, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                              mode_scale=cfg.mode_scale, shift=shift).to(device)
    x_t, target = flow.flow_pair(pack(latents), pack(noise.to(device)), t)
    with bf16_autocast(device, cfg.bf16):
        pred, label_logits = net(x_t, image_ids(b, h // 2, w // 2, device), t, captions)
    loss = (pred.float() - target).square().mean()
    if cfg.contrastive_weight and b > 1:  # the batch's next sample's target is the negative; empty captions keep none
        captioned = (~drop).to(device, torch.float32)[:, None, None]
        repel = ((pred.float() - target.roll(1, 0)).square() * captioned).mean()
        loss = loss - cfg.contrastive_weight * repel
    if label_logits is None:
        return loss, None
    if len(batch) < 3:
        raise ValueError("label_loss needs data with label maps (the shapes world); this data source has none")
    classes = label_logits.shape[-1] // 4
    targets = label_targets(batch[2].to(device), classes, (h, w)).unflatten(-1, (classes, 4))
    label_ce = -(targets * label_logits.unflatten(-1, (classes, 4)).log_softmax(2)).sum(2).mean()
    return loss + float(cfg.label_loss["weight"]) * label_ce, label_ce.detach()


def export_lora(cfg: TrainConfig, model: FlowModel, out_dir: Path) -> list[Path]:
    """The trained adapters as `NAME-lora.safetensors` (kohya) and `NAME-lora-diffusers.safetensors`."""
    from ..formats.lora import linear_shapes, save_lora
    from ..models.lora import adapter_weights
    weights, shapes = adapter_weights(model.lora), linear_shapes(model.transformer)
    size = cfg.defaults.get("width"), cfg.defaults.get("height")
    resolution = f"{size[0]}x{size[1]}" if all(size) else None
    written = []
    for layout in cfg.lora.get("save", ["kohya", "diffusers"]):
        name = f"{cfg.name}-lora.safetensors" if layout == "kohya" else f"{cfg.name}-lora-{layout}.safetensors"
        written.append(save_lora(weights, out_dir / name, shapes, layout, architecture=_modelspec_family(model),
                                 title=cfg.name, resolution=resolution))
    return written


def _modelspec_family(model: FlowModel) -> str:
    p = model.transformer.params
    return "chroma" if p.variant == "chroma" else "flux-dev" if p.guidance_embed else "flux-schnell"


@torch.no_grad()
def update_ema(ema: dict[str, Tensor], model: FlowModel, decay: float) -> None:
    for k, v in model.trained_state().items():
        if v.dtype.is_floating_point:
            ema[k].lerp_(v.detach(), 1 - decay)
        else:
            ema[k].copy_(v)


class ema_weights:
    """`with ema_weights(model, ema):` evaluates with the EMA weights, then restores the training weights."""

    def __init__(self, model: nn.Module, ema: dict[str, Tensor]):
        self.model, self.ema = model, ema

    def __enter__(self):
        self.backup = {k: v.clone() for k, v in self.model.trained_state().items()}
        self.model.load_trained_state(self.ema)
        self.model.eval()

    def __exit__(self, *exc):
        self.model.load_trained_state(self.backup)
        self.model.train()
