"""Train the small VAE of the built-in model on the shapes world, and fix its latent normalisation.

Each step: render a batch of crops (item i of step s depends only on (seed, s, i)), encode to the posterior,
sample it, decode, and minimise L1 + L2 + an edge term (L1 between image gradients, for crisp corners and star
points) + a tiny KL. The noise of step s comes from a generator seeded by (seed, s), so the checkpoint holds
only weights, optimizer moments and the step counter, and a resumed run ends bit-identical to an uninterrupted
one. At the end the latent mean/std over held-out images become `shift_factor`/`scaling_factor`, so the
diffusion model sees latents with zero mean and unit std. `builtin_stages` is the recipe of the shipped VAE.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ..formats.checkpoint import atomic_write, save_checkpoint, stop_on_signals
from ..models.precision import bf16_autocast
from ..models.vae import VAE, downsample_factor, small_vae_config
from .shapes import BACKGROUNDS, ShapesDataset, render, to_tensor

EVAL_SEED_OFFSET = 1_000_003   # held-out images: dataset seed + offset, a stream training never draws from
BACKGROUNDS_LIST = tuple(BACKGROUNDS)
_INTERVAL_FIELDS = {"log_every", "ckpt_every", "eval_every"}   # may change on resume; nothing else may


@dataclass
class VAETrainConfig:
    # small_vae_config kwargs. One norm group: a crop inside a flat shape is one colour everywhere, and a
    # per-channel-group norm would erase which colour; encoder at 256 px ~1.5 GFLOP
    vae: dict = field(default_factory=lambda: dict(block_out_channels=(16, 16, 32, 64), layers_per_block=1,
                                                   norm_num_groups=1))
    mid_block_attention: bool = False   # shapes need no global context; attention is quadratic in image size
    image_size: int = 64                # training crop side (convs are translation equivariant: use at any size)
    scene_sizes: tuple = (64, 128, 256) # each item renders its scene at one of these sizes, then crops image_size
    object_crops: bool = True           # crop around an object (else anywhere)
    # every background equally often (the world draws "default" 3 times in 4). Norms make a flat crop's features
    # blind to its brightness, so near-collinear colours (white vs default) need many examples to keep apart
    uniform_backgrounds: bool = True
    batch_size: int = 16
    steps: int = 7000
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.0           # cosine decay to lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    initial_logvar: float = -8.0        # posterior starts near-deterministic; at 0 its noise swamps the untrained means
    kl_weight: float = 1e-5             # per latent element, against per-pixel losses (= 1e-5 / 12 in LDM's sums)
    edge_weight: float = 0.5
    l2_weight: float = 1.0              # PSNR is an L2 metric: punish the rare large colour errors
    bf16: bool = True                   # autocast the convs to bf16 where that is fast (AVX-512 BF16 / AMX CPU, GPU)
    seed: int = 0
    init: str | None = None             # start from this VAE folder's weights (a fine-tuning stage)
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 500
    eval_images: int = 8                # held-out images (at the largest scene size) for PSNR while training
    stats_images: int = 512             # held-out images for the latent mean/std
    stats_size: int = 256
    final_images: int = 32              # held-out images for the final PSNR at 128 and 256 px

    def __post_init__(self):
        self.scene_sizes = tuple(self.scene_sizes)
        down = downsample_factor(self.vae_config()["block_out_channels"])
        if self.image_size % down or min(self.scene_sizes) < self.image_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {down} (the VAE's downsampling) "
                             f"and fit every scene size {self.scene_sizes}")

    def vae_config(self) -> dict:
        return {**small_vae_config(**self.vae), "mid_block_add_attention": self.mid_block_attention}

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))   # tuples -> lists, as they come back from a file


# --- data, schedule, loss -------------------------------------------------------------------------------------

def make_batch(cfg: VAETrainConfig, step: int, data: ShapesDataset) -> Tensor:
    """(B, 3, s, s) in [-1, 1]. Item i is scene step * B + i, rendered at a size from cfg.scene_sizes and cropped
    around one of its objects (most of a canvas is flat background, which is learnt in a few steps) or anywhere;
    size, object and offset come from (seed, step, i)."""
    s, items = cfg.image_size, []
    for i in range(cfg.batch_size):
        rng = np.random.default_rng([cfg.seed, step, i])
        size = cfg.scene_sizes[int(rng.integers(len(cfg.scene_sizes)))]
        scene, _ = data.scene(step * cfg.batch_size + i)
        if cfg.object_crops:
            centre = np.array(scene.objects[int(rng.integers(len(scene.objects)))].centre) * size
            centre += rng.uniform(-s / 2, s / 2, size=2)
        else:
            centre = rng.uniform(s / 2, size - s / 2, size=2)
        x, y = (int(np.clip(round(c - s / 2), 0, size - s)) for c in centre)
        if cfg.uniform_backgrounds:
            scene.background = BACKGROUNDS_LIST[int(rng.integers(len(BACKGROUNDS_LIST)))]
        items.append(to_tensor(render(scene, size))[:, y:y + s, x:x + s])
    return torch.stack(items)


def lr_at(cfg: VAETrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _grad_l1(a: Tensor, b: Tensor) -> Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return 0.5 * ((dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean())


def vae_loss(vae: VAE, images: Tensor, cfg: VAETrainConfig, generator: torch.Generator) -> dict[str, Tensor]:
    with bf16_autocast(images.device, cfg.bf16):
        posterior = vae.ae.encode(images)
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    z = mean + torch.exp(0.5 * logvar) * noise
    with bf16_autocast(images.device, cfg.bf16):
        recon = vae.ae.decode(z).float()
    l1 = (recon - images).abs().mean()
    l2 = (recon - images).square().mean()
    edge = _grad_l1(recon, images)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    loss = l1 + cfg.edge_weight * edge + cfg.l2_weight * l2 + cfg.kl_weight * kl
    return {"loss": loss, "l1": l1, "l2": l2, "edge": edge, "kl": kl}


# --- evaluation -----------------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruct(vae: VAE, images: Tensor) -> Tensor:
    """Encode (posterior mean) and decode one image at a time, clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(img[None])).float().clamp(-1, 1) for img in images])


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = (a.float() - b.float()).square().mean().item()
    return 10 * math.log10(4 / max(mse, 1e-20))


@torch.no_grad()
def measure_latent_stats(vae: VAE, dataset: ShapesDataset, n: int = 512) -> tuple[float, float]:
    """(mean, std) of the raw posterior means (before shift/scale) over dataset items 0..n-1, all elements."""
    total = total_sq = count = 0.0
    for i in range(n):
        img, _ = dataset[i]
        z = vae.ae.encode(img[None].to(next(vae.parameters()).device)).mean.double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def comparison_image(originals: Tensor, recons: Tensor) -> Image.Image:
    """Originals in the top row, reconstructions below."""
    grid = torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(recons), dim=2)], dim=1)
    array = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


# --- checkpoints ----------------------------------------------------------------------------------------------

def save_state(folder: Path, step: int, vae: VAE, opt: torch.optim.Optimizer, cfg: VAETrainConfig,
               elapsed_s: float = 0.0) -> None:
    """One safetensors file (weights + Adam moments, meta in its header) written atomically, and a JSON copy of
    the meta for people. The safetensors header is the truth, so a crash between the two writes is harmless."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = opt.state_dict()
    tensors = {f"model.{k}": v for k, v in vae.ae.state_dict().items()}
    tensors |= {f"optimizer.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    meta = {"step": step, "elapsed_s": round(elapsed_s, 1), "config": cfg.to_json(), "param_groups": sd["param_groups"]}
    save_checkpoint(tensors, folder / "trainer.safetensors", metadata={"trainer": json.dumps(meta)})
    with atomic_write(folder / "trainer.json", "w") as f:
        json.dump(meta, f, indent=1)


def load_state(folder: Path, vae: VAE, opt: torch.optim.Optimizer, cfg: VAETrainConfig) -> dict:
    """Restore weights and optimizer from `folder`; returns the meta (step to continue from, elapsed_s)."""
    path = folder / "trainer.safetensors"
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["trainer"])
    changed = sorted(k for k, v in cfg.to_json().items() if meta["config"].get(k) != v and k not in _INTERVAL_FIELDS)
    if changed:
        raise ValueError(f"{path}: cannot resume, the config differs in {changed}; use a new out_dir or resume=False")
    tensors = load_file(path)
    vae.ae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            index, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written by a run that crashed after its last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))


# --- the loop -------------------------------------------------------------------------------------------------

def train_vae(cfg: VAETrainConfig, out_dir: str | Path, progress: bool = True, resume: bool = True) -> VAE:
    """Train, checkpointing to out_dir/state; then write out_dir/vae (normalised), reconstructions.png and
    summary.json. resume=True continues from out_dir/state if it exists; resume=False starts over."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir, metrics = out_dir / "state", out_dir / "metrics.jsonl"
    torch.manual_seed(cfg.seed)
    vae = VAE(cfg.vae_config())
    head = vae.ae.quant_conv if vae.ae.quant_conv is not None else vae.ae.encoder.conv_out  # emits (mean, logvar)
    with torch.no_grad():
        head.bias[vae.latent_channels:] = cfg.initial_logvar
    vae.ae.slicing = False   # a training batch runs as one; VAE's one-at-a-time slicing is for inference
    vae.to(memory_format=torch.channels_last)   # oneDNN's preferred layout: ~1.2x faster CPU convs
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0   # elapsed: training seconds over all sessions of this run
    if resume and (state_dir / "trainer.safetensors").exists():
        meta = load_state(state_dir, vae, opt, cfg)
        step, elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        _truncate_metrics(metrics, step)
    else:
        metrics.unlink(missing_ok=True)
        if cfg.init:
            vae.ae.load_state_dict(VAE.load(cfg.init).ae.state_dict())

    data = ShapesDataset(cfg.seed)
    eval_size = max(cfg.scene_sizes)
    held_out = ShapesDataset(cfg.seed + EVAL_SEED_OFFSET, eval_size, as_tensor=True)
    eval_batch = torch.stack([held_out[i][0] for i in range(cfg.eval_images)])

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="vae", dynamic_ncols=True)
    start, images_seen = time.perf_counter(), 0
    with stop_on_signals() as stop:
        while step < cfg.steps:
            vae.train()
            images = make_batch(cfg, step, data).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            losses = vae_loss(vae, images, cfg, torch.Generator().manual_seed(cfg.seed * 1_000_000 + step))
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            images_seen += len(images)
            ips = images_seen / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss'].item():.4f}", img_s=f"{ips:.1f}")

            record = None
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, **{k: round(v.item(), 6) for k, v in losses.items()},
                          "grad_norm": round(grad_norm.item(), 4), "lr": lr_at(cfg, step - 1),
                          "images_per_s": round(ips, 2), "elapsed_s": round(elapsed + time.perf_counter() - start, 1)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                vae.eval()
                score = psnr(reconstruct(vae, eval_batch), eval_batch)
                record = (record or {"step": step}) | {"eval_psnr": round(score, 3)}
                bar.write(f"step {step}: eval PSNR {record['eval_psnr']:.2f} dB at {eval_size} px")
            if record:
                _append_jsonl(metrics, record)
            stopping = stop["signal"] is not None  # Ctrl-C / SIGTERM: finish the step, save, stop
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                save_state(state_dir, step, vae, opt, cfg, elapsed + time.perf_counter() - start)
            if stopping:
                bar.close()
                print(f"vae: stopped by signal {stop['signal']} at step {step}; state saved in {state_dir}; "
                      "the same command resumes", file=sys.stderr)
                raise KeyboardInterrupt
    bar.close()
    return finalize(vae, cfg, out_dir, elapsed + time.perf_counter() - start)


def finalize(vae: VAE, cfg: VAETrainConfig, out_dir: Path, train_seconds: float = 0.0) -> VAE:
    """Measure and write the latent normalisation, save the VAE, a comparison image and a summary."""
    vae.eval()
    vae.ae.slicing = True
    stats_data = ShapesDataset(cfg.seed + EVAL_SEED_OFFSET, cfg.stats_size, as_tensor=True)
    mean, std = measure_latent_stats(vae, stats_data, cfg.stats_images)
    vae.ae.config.shift_factor, vae.ae.config.scaling_factor = mean, 1.0 / std
    vae.save(out_dir / "vae")

    summary = {}
    for size in (128, 256):
        held_out = ShapesDataset(cfg.seed + EVAL_SEED_OFFSET + 1, size, as_tensor=True)
        originals = torch.stack([held_out[i][0] for i in range(cfg.final_images)])
        recons = reconstruct(vae, originals)
        summary[f"psnr_{size}"] = round(psnr(recons, originals), 3)
    with atomic_write(out_dir / "reconstructions.png") as f:
        comparison_image(originals[:8], recons[:8]).save(f, format="PNG")
    summary |= {"latent_mean": mean, "latent_std": std, "shift_factor": mean, "scaling_factor": 1.0 / std,
                "parameters": sum(p.numel() for p in vae.parameters()), "train_seconds": round(train_seconds, 1),
                "threads": torch.get_num_threads(), "config": cfg.to_json()}
    with atomic_write(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return vae


# --- the built-in model's VAE ---------------------------------------------------------------------------------

def builtin_stages(**vae) -> list[VAETrainConfig]:
    """The recipe of the shipped VAE (~25 min on 2 CPU cores): 7000 steps from scratch on the world's own
    background mix, then 4000 steps on fresh scenes (seed 1) with every background equally often, which taught
    it white from the default off-white. Stage 2's `init` is stage 1's output folder. `vae` overrides fields of
    the architecture in both stages (e.g. latent_channels=4)."""
    arch = {**VAETrainConfig().vae, **vae}
    return [VAETrainConfig(vae=arch, uniform_backgrounds=False),
            VAETrainConfig(vae=arch, seed=1, steps=4000, lr=5e-4, warmup=100, uniform_backgrounds=True)]


def train_builtin_vae(out_dir: str | Path, progress: bool = True, **vae) -> VAE:
    """Run both stages into out_dir/stage1 and out_dir/stage2 (each resumable); the VAE is out_dir/stage2/vae."""
    out_dir = Path(out_dir)
    first, second = builtin_stages(**vae)
    train_vae(first, out_dir / "stage1", progress)
    second.init = str(out_dir / "stage1" / "vae")
    return train_vae(second, out_dir / "stage2", progress)
