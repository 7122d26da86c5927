"""Training recipes and their driver: `chromaflow train --preset default` trains the VAE and the text encoder,
then the DiT, then exports a model folder with a model card (eval table, sample grid, wall time).

The engine trains; this layer adds what needs a Pipeline: sample grids during training, the benchmark, export.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..engine import evaluate as bench
from ..engine.train import FlowModel, TrainConfig, base_model_files, latest_checkpoint, train, transformer_params
from ..models.vae import VAE, small_vae_config
from .loading import save_folder
from .pipeline import Defaults, Pipeline

SAMPLE_PROMPTS = ["a red circle", "a blue square above a yellow star", "two green triangles",
                  "три оранжевых круга", "一个紫色的五角星在一个红色的正方形的左边", "a small yellow star on a black background"]
# grid labels: the default font has no Cyrillic or CJK glyphs, so those prompts are labelled by what they say
SAMPLE_LABELS = SAMPLE_PROMPTS[:3] + ["ru: three orange circles", "zh: a purple star left of a red square",
                                      SAMPLE_PROMPTS[5]]

# VAE stage settings (engine.train_vae.VAETrainConfig fields) and the DiT stage (TrainConfig fields)
PRESETS: dict[str, dict] = {
    "default": {
        "vae": "builtin",  # train_vae.train_builtin_vae: two stages, ~25 min ({"builtin": {...}} edits its layers)
        # train_text: an encoder that sees word order (rotary positions), binds colours to shapes per token
        # (fact_tokens) and has every token of an object's phrase state that object's facts, its side in a relation
        # included (span_tokens), on relation-heavy captions (55%, against the world's 25%): held-out captions all
        # right 80%, relation captions 65%, both objects' sides right 91% (README, Train)
        "text": {"encoder": {"width": 256, "depth": 3, "heads": 4, "max_length": 160, "pool": 4, "pool_kernel": 8,
                             "rope_theta": 100},
                 "steps": 3000, "batch_size": 64, "lr": 2e-3,
                 "fact_tokens": 0.3, "span_tokens": 1.0, "kind_weights": [0.15, 0.15, 0.55, 0.15]},
        "train": {
            "name": "default",
            # 16 attention heads of width 16 (more RoPE probes per block); positions that scale with the image
            # (position_grid 8: a 256 px image spans the 8 units of a 128 px one, so the layout learned in the
            # cheap 128 px steps holds at 256)
            "model": {"preset": "default", "num_heads": 16, "axes_dim": [4, 6, 6], "position_grid": 8},
            "train_text_encoder": False,  # pretrained by the "text" stage, then frozen (as T5 is for Chroma)
            # centred object groups and the shape-label loss (README, Train: each measured in a proxy)
            "data": {"kind": "shapes", "seed": 0, "centre_jitter": 0.05},
            "label_loss": {"weight": 0.5, "block": 2},
            # mostly 128 px early (4x cheaper per sample), every 4th step at 256; then 256 only, with timesteps
            # shifted to high noise, where a caption decides what is drawn (150-step A/B from step 3557, 32 single-
            # object prompts: colour 66 -> 84%, shape 22 -> 44% against the same steps unshifted)
            # then, from step 4142 (where the run that made this model resumed from a committed checkpoint), objects
            # at least 0.12 of the canvas apart (about two 16 px tokens at 256 px, against the world's 0.05: the
            # model merged neighbours, the commonest counting failure) and more count and relation scenes
            "stages": [{"steps": 4000, "size": [128, 128, 128, 256], "batch_size": [64, 64, 64, 32]},
                       {"steps": 142, "size": 256, "batch_size": 32, "loss": {"timestep_shift": 3.0}},
                       {"steps": 1358, "size": 256, "batch_size": 32, "loss": {"timestep_shift": 3.0},
                        "data": {"gap": 0.12, "kind_weights": [0.25, 0.15, 0.3, 0.3]}}],
            "lr": 5e-4, "warmup_steps": 200, "ema_decay": 0.999, "caption_dropout": 0.1,
            "timesteps": "chroma", "checkpoint_every": 250, "sample_every": 500,
            # cfg 6 against 4, on the v3 model, n=50: single-object all-correct 60 -> 63%, overall 26 -> 28%
            # (on the v4 model, cfg 8 against 6: single 84 -> 78%, two-object 27 -> 32%, overall 42 -> 41%)
            "defaults": {"width": 256, "height": 256, "steps": 20, "cfg": 6.0},
        },
        "eval": {"n_per_category": 50},
    },
    "tiny": {  # every stage of the recipe in seconds, for tests
        "vae": {"vae": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 1},
                "image_size": 32, "scene_sizes": [32, 64], "batch_size": 4, "steps": 4, "eval_images": 2,
                "stats_images": 4, "stats_size": 64, "final_images": 2},
        "text": {"encoder": {"width": 32, "depth": 1, "heads": 2, "max_length": 64}, "steps": 3, "batch_size": 4,
                 "eval_captions": 6},
        "train": {
            "name": "tiny", "model": {"preset": "tiny"},
            "stages": [{"steps": 4, "size": [32, 64], "batch_size": [4, 2]}], "warmup_steps": 2,
            "checkpoint_every": 2, "defaults": {"width": 64, "height": 64, "steps": 3, "cfg": 2.0},
        },
        "eval": {"n_per_category": 1},
    },
}


# about an hour: a shorter run of the default recipe
PRESETS["quick"] = {**PRESETS["default"], "eval": {"n_per_category": 20}, "train": {
    **PRESETS["default"]["train"], "name": "quick", "warmup_steps": 100, "ema_decay": 0.998,
    "checkpoint_every": 100, "sample_every": 300,
    "stages": [{"steps": 900, "size": [128, 128, 128, 256], "batch_size": [64, 64, 64, 32]},
               {"steps": 250, "size": 256, "batch_size": 32}]}}

# the shipped model's run used this name before its recipe became the default
PRESETS["v5"] = {**PRESETS["default"], "train": {**PRESETS["default"]["train"], "name": "v5"}}

# the model before it (v4): the same until step 4142, then the world's own gap and scene mix to the end
PRESETS["v4"] = {**PRESETS["default"], "train": {**PRESETS["default"]["train"], "name": "v4", "stages": [
    PRESETS["default"]["train"]["stages"][0],
    {"steps": 1500, "size": 256, "batch_size": 32, "loss": {"timestep_shift": 3.0}}]}}

# the built-in model before v4 (v3): its text encoder has learned absolute positions only and is read
# through the average of its tokens alone (no rotary positions, no per-token readouts), on the world's caption mix
PRESETS["v3"] = {**PRESETS["default"], "train": {**PRESETS["v4"]["train"], "name": "v3"}, "text": {
    "encoder": {"width": 256, "depth": 3, "heads": 4, "max_length": 160, "pool": 4},
    "steps": 3000, "batch_size": 64, "lr": 2e-3}}

# the one before it (v2): v3 with 4 heads of width 64, one RoPE position per token, objects placed anywhere, no
# shape-label loss
PRESETS["v2"] = {**PRESETS["v3"], "train": {
    **{k: v for k, v in PRESETS["v3"]["train"].items() if k != "label_loss"}, "name": "v2",
    "model": {"preset": "default"}, "data": {"kind": "shapes", "seed": 0}}}


def recipe(preset_or_path: str) -> dict:
    if preset_or_path in PRESETS:
        return json.loads(json.dumps(PRESETS[preset_or_path]))  # a deep copy
    path = Path(preset_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"{preset_or_path}: no such config file, and not a preset "
                                f"(presets: {', '.join(PRESETS)})")
    raw = json.loads(path.read_text())
    return raw if "train" in raw else {"train": raw}


def preview_grid(model: FlowModel, vae: VAE, path: Path | None, defaults: dict | None = None) -> None:
    """Sample the preview prompts; `path` None only computes (the other ranks of a sharded model take part)."""
    pipe = Pipeline(model.transformer, model.text, vae, defaults=Defaults(**(defaults or {})),
                    device=next(model.transformer.parameters()).device)
    images = pipe(SAMPLE_PROMPTS, seed=0, progress=False).images
    if path is not None:
        bench.sample_grid(images, SAMPLE_LABELS, str(path), cols=len(images))


def evaluate_pipeline(pipe: Pipeline, n_per_category: int = 50, seed: int = 0, batch_size: int = 16,
                      grid_path: str | None = None, progress: bool = False, **settings) -> dict:
    """The compositional benchmark on held-out prompts; image i of the benchmark uses seed + i."""
    prompts = bench.benchmark_prompts(n_per_category, seed=seed)
    counter = {"i": 0}
    cache = {"calls": 0, "full_passes": 0}  # step-cache totals over every call, when `cache` is set

    def generate(texts):
        out = pipe(texts, seed=seed + counter["i"], progress=False, **settings)
        counter["i"] += len(texts)
        for key in cache:
            cache[key] += out.settings.get("cache", {}).get(key, 0)
        return out.images

    report = bench.evaluate(generate, prompts, batch_size=batch_size, grid_path=grid_path, progress=progress)
    report["settings"] = {"n_per_category": n_per_category, "seed": seed, **asdict(pipe.defaults), **settings}
    if cache["calls"]:
        report["cache"] = cache
    return report


def builtin_vae_overrides(vae_spec) -> dict | None:
    """A recipe's `vae` entry -> the architecture overrides of the shipped two-stage VAE recipe, or None for a
    single-stage VAETrainConfig dict. "builtin" is the shipped recipe; {"builtin": {"latent_channels": 4}} the
    same with small_vae_config fields changed."""
    if vae_spec == "builtin":
        return {}
    if not (isinstance(vae_spec, dict) and "builtin" in vae_spec):
        return None
    allowed = set(inspect.signature(small_vae_config).parameters) - {"scaling_factor", "shift_factor"}
    overrides = vae_spec["builtin"]
    if len(vae_spec) > 1 or not isinstance(overrides, dict) or set(overrides) - allowed:
        raise ValueError(f"recipe `vae`: {{\"builtin\": {{...}}}} takes only VAE architecture fields "
                         f"({', '.join(sorted(allowed))}), got {vae_spec!r}")
    return overrides


def run(preset_or_path: str, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
        stop_after: int | None = None, time_limit: float | None = None) -> Path | None:
    """Train every stage of a recipe into out_dir; returns the exported model folder once training completes (for a
    LoRA recipe: the folder holding the LoRA files, evaluated with the LoRA applied). `time_limit` (seconds) bounds
    the transformer stage of this call; the VAE and text-encoder stages, when the recipe has them, run to the end."""
    spec = recipe(preset_or_path)
    cfg = TrainConfig.from_dict(spec["train"])
    out = Path(out_dir or Path("runs") / cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not cfg.vae and cfg.base:
        cfg.vae = str(base_model_files(cfg.base)[2] or "")
    if not cfg.vae:
        if "vae" not in spec:
            raise ValueError("the config names no `vae` folder and has no `vae` training stage")
        from ..engine.train_vae import VAETrainConfig, train_builtin_vae, train_vae
        builtin = builtin_vae_overrides(spec["vae"])
        if builtin is not None:  # the shipped VAE's two-stage recipe
            cfg.vae = str(out / "vae_train" / "stage2" / "vae")
            if not Path(cfg.vae, "config.json").is_file():
                train_builtin_vae(out / "vae_train", progress=progress, **builtin)
        else:
            cfg.vae = str(out / "vae_train" / "vae")
            if not Path(cfg.vae, "config.json").is_file():
                train_vae(VAETrainConfig(**spec["vae"]), out / "vae_train", resume=resume, progress=progress)
    if "text" in spec and not cfg.text_encoder.get("path"):
        from ..engine.train_text import TextTrainConfig, train_text_encoder
        folder = out / "text_train" / "text_encoder"
        if not (folder / "config.json").is_file():
            text = {**spec["text"], "encoder": {"out_dim": transformer_params(cfg).context_in_dim,
                                                **spec["text"].get("encoder", {})}}
            train_text_encoder(TextTrainConfig(**text), folder.parent, progress=progress)
        cfg.text_encoder = {"path": str(folder)}
    model = train(cfg, out / "dit", resume=resume, progress=progress, stop_after=stop_after, time_limit=time_limit,
                  preview=lambda m, vae, path: preview_grid(m, vae, path, cfg.defaults))
    ckpt = latest_checkpoint(out / "dit")
    state = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    if state.get("step", 0) < cfg.total_steps or int(os.environ.get("RANK", "0")) != 0:
        return None  # unfinished; or under torchrun, a rank other than 0 (rank 0 evaluates and exports)
    device = next(model.transformer.parameters()).device  # where training ran: evaluate there too
    vae = VAE.load(cfg.vae).to(device)
    pipe = Pipeline(model.transformer, model.text, vae, name=cfg.name, defaults=Defaults(**cfg.defaults),
                    device=device)
    report = evaluate_pipeline(pipe, grid_path=str(out / "eval-grid.png"), progress=progress,
                               **spec.get("eval", {}))
    (out / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if cfg.lora:  # the adapters are the result (hooked into `pipe` above); the base model is not re-exported
        return out / "dit"
    hours = {"dit": state.get("wall_time", 0.0) / 3600, "stages": _stage_hours(out),
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "this machine's CPU"}
    text_report = out / "text_train" / "report.json"
    text = json.loads(text_report.read_text()) if text_report.is_file() else None
    card = model_card(preset_or_path, cfg, report, hours, time.time() - started, text)
    folder = save_folder(pipe, out / "model", card=card, dtype=torch.bfloat16)
    shutil.copyfile(out / "dit" / "samples-final.png", folder / "samples.png")
    return folder


def _stage_hours(out: Path) -> float:
    """Training time of the VAE and text-encoder stages, from the last `elapsed_s` of each metrics log."""
    total = 0.0
    for metrics in [*(out / "vae_train").rglob("metrics.jsonl"), *(out / "text_train").rglob("metrics.jsonl")]:
        total += max((json.loads(line).get("elapsed_s", 0.0) for line in metrics.read_text().splitlines() if line),
                     default=0.0)
    return total / 3600


def _stage_text(stage) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in {**stage.loss, **stage.data}.items())
    return f"{stage.steps} at {stage.size}px x{stage.batch_size}" + (f" ({settings})" if settings else "")


def model_card(preset: str, cfg: TrainConfig, report: dict, hours: dict, session_seconds: float,
               text: dict | None = None) -> str:
    """`hours`: DiT and earlier-stage hours, and where the DiT's last session ran; `text`: the text-encoder stage's
    report.json, when the recipe has that stage."""
    text_line = [] if text is None else [
        f"- text encoder: pretrained {text['config']['steps']} steps on caption content, then frozen; held-out "
        f"captions with every label right: {100 * text['held_out']['all_correct']:.0f}% "
        f"(en {100 * text['held_out']['en']:.0f}, zh {100 * text['held_out']['zh']:.0f}, "
        f"ru {100 * text['held_out']['ru']:.0f})"]
    return "\n".join([
        f"# chromaflow built-in model `{cfg.name}`", "",
        f"Trained by `chromaflow train {'--preset ' if preset in PRESETS else ''}{preset}` (same trainer as for "
        "real Chroma).", "",
        *text_line,
        f"- steps: {cfg.total_steps} ({', '.join(_stage_text(s) for s in cfg.stage_list)})",
        f"- flow loss: timesteps {cfg.timesteps}, shift {cfg.timestep_shift}, minibatch OT pairing "
        f"{'on' if cfg.ot_pairing else 'off'}, caption dropout {cfg.caption_dropout}"
        + (f", shape-label loss {cfg.label_loss['weight']} x cross-entropy after block {cfg.label_loss['block']}"
           if cfg.label_loss else "")
        + (f", contrastive weight {cfg.contrastive_weight}" if cfg.contrastive_weight else "")
        + f"; AdamW lr {cfg.lr}, EMA {cfg.ema_decay}",
        f"- transformer: {json.dumps(cfg.model)}",
        f"- data: {json.dumps(cfg.data)}",
        f"- training wall time: {hours['stages'] + hours['dit']:.2f} h in all: VAE and text-encoder stages "
        f"{hours['stages']:.2f} h, DiT {hours['dit']:.2f} h (all sessions; the last on {hours['device']})",
        f"- generation defaults: {cfg.defaults}", "",
        "## Compositional benchmark (held-out prompts)", "", bench.markdown_table(report), "",
        "![samples](samples.png)", ""])
