"""Train the tiny text-to-image teacher shipped in ``fastlcm/assets/tiny_teacher`` (and the caption classifier).

``python -m fastlcm.demo.teacher --out DIR [--vae-steps N] [--unet-steps N] [--classifier-steps N]``

Three stages on the procedural set (:mod:`fastlcm.demo.procedural`), all on CPU in a few tens of minutes:

1. AutoencoderKL, 4 blocks (8× downsampling as in SD: 64 px ↔ 8×8×4 latents), trained as a plain autoencoder
   on the posterior mean (MSE + 0.1 L1), then its posterior log-variance is pinned at −12 so ``encode().sample()``
   is the mean up to 0.0025 noise; ``scaling_factor`` = 1/std of the latents (how SD's 0.18215 was chosen).
2. UNet2DConditionModel (epsilon prediction, scaled_linear betas, 1000 steps) with the VAE frozen, trained
   jointly with a small CLIPTextModel from random init; 10% of captions are dropped to "" for classifier-free
   guidance; an EMA of the weights is what gets saved.
3. The caption classifier used by ``fastlcm eval``.

The result is saved with the stock ``StableDiffusionPipeline.save_pretrained`` (fp16 safetensors), so it loads
like any hub checkpoint: ``StableDiffusionPipeline.from_pretrained(DIR)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class TeacherConfig:
    """Sizes and training budget of the tiny teacher."""

    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    """AutoencoderKL block widths; n blocks downsample by 2^(n-1) (4 blocks: 64 px ↔ 8×8×4 latents, as SD)."""
    unet_channels: tuple[int, ...] = (32, 64, 64)
    """UNet block widths (first block plain, the others with cross-attention)."""
    text_hidden: int = 64
    """CLIP text encoder width (= the UNet's cross_attention_dim)."""
    text_layers: int = 2
    """CLIP text encoder depth."""
    max_tokens: int = 16
    """Tokenizer model_max_length (captions are at most 14 tokens with BOS/EOS)."""
    num_images: int = 4096
    """Procedural images encoded once and reused by the UNet stage."""
    vae_steps: int = 1200
    """Optimizer steps for the VAE."""
    vae_crop: int = 64
    """The VAE trains on random crops of this size (it is fully convolutional; 4× cheaper than 64 px)."""
    unet_steps: int = 3500
    """Optimizer steps for the UNet + text encoder."""
    vae_minutes: float = 0.0
    """Wall-clock budget of the VAE stage in minutes (0 = none); the LR schedule follows max(step, time) progress."""
    unet_minutes: float = 0.0
    """Wall-clock budget of the UNet stage in minutes (0 = none)."""
    classifier_steps: int = 800
    """Optimizer steps for the caption classifier (0 = skip)."""
    batch_size: int = 64
    """Batch size of the UNet and classifier stages."""
    vae_batch_size: int = 8
    """Batch size of the VAE stage (crops)."""
    vae_lr: float = 1e-3
    """VAE learning rate (cosine decay)."""
    unet_lr: float = 6e-4
    """UNet / text encoder learning rate (warm-up then cosine decay)."""
    ema_decay: float = 0.999
    """EMA of the UNet and text encoder weights; the EMA is saved."""
    caption_dropout: float = 0.1
    """Fraction of captions replaced by "" (teaches the unconditional branch for CFG)."""
    seed: int = 0
    """Seed of data, init and noise."""
    threads: int = 1
    """torch intra-op threads (1 is far faster than 2 on a CPU shared with other jobs: no spinning workers)."""


def build_models(cfg: TeacherConfig, tokenizer):
    """Fresh (vae, text_encoder, unet) for ``cfg``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=2 * cfg.text_hidden,
            num_attention_heads=4,
            num_hidden_layers=cfg.text_layers,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=cfg.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="quick_gelu",
        )
    )
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=64 // 2 ** (n - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
        norm_num_groups=8,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8,
    )
    return vae, text_encoder, unet


def make_scheduler():
    """The teacher's DDIM scheduler (SD1.5 settings, epsilon prediction)."""
    from fastlcm.testing import ddim_scheduler

    return ddim_scheduler("epsilon")


class _Progress:
    """Warm-up + cosine LR over max(step / steps, elapsed / budget); ``done`` once either runs out."""

    def __init__(self, opt, steps: int, minutes: float, warmup: int):
        self.opt, self.steps, self.budget, self.warmup = opt, steps, minutes * 60.0, warmup
        self.base = [g["lr"] for g in opt.param_groups]
        self.t0 = time.perf_counter()

    def fraction(self, step: int) -> float:
        f = step / max(1, self.steps)
        if self.budget > 0:
            f = max(f, (time.perf_counter() - self.t0) / self.budget)
        return min(1.0, f)

    def done(self, step: int) -> bool:
        return step >= self.steps or (step > self.warmup and self.fraction(step) >= 1.0)

    def set_lr(self, step: int) -> None:
        scale = (step + 1) / self.warmup if step < self.warmup else 0.5 * (1 + math.cos(math.pi * self.fraction(step)))
        for g, base in zip(self.opt.param_groups, self.base):
            g["lr"] = base * scale

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def train_vae(vae, images, cfg: TeacherConfig, log):
    """Reconstruction (MSE + 0.1 L1) of the posterior mean plus a 1e-6 penalty on its magnitude; pixels in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    prog = _Progress(opt, cfg.vae_steps, cfg.vae_minutes, warmup=min(50, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train()
    size, crop = images.shape[-1], min(cfg.vae_crop, images.shape[-1])
    step = 0
    while not prog.done(step):
        prog.set_lr(step)
        idx = torch.randint(0, images.shape[0], (cfg.vae_batch_size,), generator=gen)
        top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen))
        x = images[idx, :, top : top + crop, left : left + crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-6 * post.mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.5f} ({prog.elapsed():.0f} s)")
        step += 1
    log(f"vae stopped after {step} steps ({prog.elapsed():.0f} s)")
    # Trained as a plain autoencoder (decoding the posterior mean converges far faster on a CPU budget); fix
    # the posterior's log-variance at -12 (std 0.0025) so encode().sample() ≈ the mean, as with SD's VAE.
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(-12.0)
    vae.eval().requires_grad_(False)


def posterior_moments(vae, images, batch: int = 256):
    """(means, stds) of the latent posterior, unscaled."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            d = vae.encode(images[i : i + batch]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, tokenizer, latents, captions, cfg: TeacherConfig, log):
    """Epsilon-prediction denoising loss; returns EMA copies (unet, text_encoder)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(make_scheduler().config)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    prog = _Progress(opt, cfg.unet_steps, cfg.unet_minutes, warmup=min(100, cfg.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    unet.train()
    text_encoder.train()
    running = None
    step = 0
    while not prog.done(step):
        prog.set_lr(step)
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=gen)
        z0 = latents[idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        tok = torch.where(drop[:, None], empty, ids[idx])
        cond = text_encoder(tok).last_hidden_state
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"unet step {step}/{cfg.unet_steps} loss {running:.4f} ({prog.elapsed():.0f} s)")
        step += 1
    log(f"unet stopped after {step} steps ({prog.elapsed():.0f} s)")
    return ema_unet.eval(), ema_text.eval()


def latent_dataset(vae, cfg: TeacherConfig, scaling_factor: float, images):
    """Scaled latents of every image (the posterior mean; its std is fixed near zero)."""
    mean, _ = posterior_moments(vae, images)
    return mean * scaling_factor


def train_and_save_classifier(out: Path, cfg: TeacherConfig, log) -> dict:
    """Train the caption classifier, save ``out/caption_classifier.safetensors``; return held-out accuracy."""
    import torch

    from fastlcm.demo.procedural import agreement, classify, procedural_batch, save_classifier, train_classifier

    torch.set_num_threads(cfg.threads)
    clf = train_classifier(steps=cfg.classifier_steps, batch_size=cfg.batch_size, seed=cfg.seed, log=log)
    save_classifier(clf, Path(out) / "caption_classifier.safetensors")
    held_out, _, labels = procedural_batch(0, 1000, seed=cfg.seed + 9999)  # a seed training never uses
    acc = agreement(classify(clf, held_out), labels)
    log(f"classifier held-out accuracy (1000 clean images) {acc}")
    return acc


def teacher_grid(teacher: str | Path, out_png: str | Path, columns: int = 10, guidance: float = 7.0, seed: int = 0):
    """PNG of the teacher following captions: row 1 the procedural render of each caption, rows 2–3 50-step
    DDIM + CFG samples from two noises. Returns the captions (left to right)."""
    import numpy as np
    import torch

    from fastlcm.demo.procedural import render
    from fastlcm.sampling.evaluate import EvalTeacher, ddim_sample, eval_prompts, save_grid
    from fastlcm.sampling.options import EvalConfig

    t = EvalTeacher(teacher)
    prompts, labels = eval_prompts(columns, seed)
    cond, uncond = t.encode(prompts), t.unconditional(columns)
    rows = [np.stack([render(lab) for lab in labels])]
    s = t.latent_size
    for k in range(2):
        noise = torch.randn(columns, 4, s, s, generator=torch.Generator().manual_seed(seed + k))
        z = ddim_sample(t.unet, t.scheduler_config, noise, cond, uncond, EvalConfig().reference_steps, guidance)
        rows.append(t.decode(z))
    save_grid(rows, out_png)
    return prompts


def train_teacher(out: str | Path, cfg: TeacherConfig | None = None, log=print) -> Path:
    """Run every stage and save the pipeline (and classifier) under ``out``; returns ``out``."""
    import torch
    from diffusers import StableDiffusionPipeline

    from fastlcm.demo.procedural import procedural_batch, to_model_input, write_caption_tokenizer

    cfg = cfg or TeacherConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = write_caption_tokenizer(out / "_tokenizer_tmp", max_length=cfg.max_tokens)
    vae, text_encoder, unet = build_models(cfg, tokenizer)
    arrays, captions, _ = procedural_batch(0, cfg.num_images, seed=cfg.seed)
    images = to_model_input(arrays)
    log(f"{cfg.num_images} procedural images; params vae {sum(p.numel() for p in vae.parameters())/1e6:.2f}M "
        f"text {sum(p.numel() for p in text_encoder.parameters())/1e6:.2f}M "
        f"unet {sum(p.numel() for p in unet.parameters())/1e6:.2f}M")

    train_vae(vae, images, cfg, log)
    mean, _ = posterior_moments(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        rec = vae.decode(mean[:256]).sample
    vae_mse = float(((rec - images[:256]) ** 2).mean())
    log(f"vae reconstruction mse {vae_mse:.5f} (pixels in [-1,1]); scaling_factor {scaling:.4f}")

    latents = latent_dataset(vae, cfg, scaling, images)
    unet, text_encoder = train_unet(unet, text_encoder, tokenizer, latents, captions, cfg, log)

    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    teacher_dir = out / "tiny_teacher"
    pipe.save_pretrained(teacher_dir, safe_serialization=True)
    for p in (out / "_tokenizer_tmp").iterdir():
        p.unlink()
    (out / "_tokenizer_tmp").rmdir()

    info = {"config": asdict(cfg), "vae_reconstruction_mse": vae_mse, "scaling_factor": scaling}
    if cfg.classifier_steps:
        info["classifier_held_out"] = train_and_save_classifier(out, cfg, log)
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "tiny_teacher_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {teacher_dir} in {info['wall_s']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = TeacherConfig()
    p = argparse.ArgumentParser(prog="python -m fastlcm.demo.teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (tiny_teacher/ + classifier)")
    p.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    p.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    p.add_argument("--classifier-steps", type=int, default=defaults.classifier_steps)
    p.add_argument("--vae-minutes", type=float, default=defaults.vae_minutes, help="wall-clock cap (0 = none)")
    p.add_argument("--unet-minutes", type=float, default=defaults.unet_minutes, help="wall-clock cap (0 = none)")
    p.add_argument("--num-images", type=int, default=defaults.num_images)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size)
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--tiny", action="store_true", help="a minimal model config (smoke tests)")
    p.add_argument("--classifier-only", action="store_true", help="train and save only the caption classifier")
    p.add_argument("--grid-only", type=Path, default=None, metavar="TEACHER",
                   help="write OUT/teacher_grid.png for an existing teacher folder, then exit")
    a = p.parse_args(argv)
    for flag in ("vae_steps", "unet_steps", "num_images", "batch_size", "vae_batch_size", "threads"):
        if getattr(a, flag) < (0 if flag.endswith("steps") else 1):
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
    cfg = TeacherConfig(
        vae_steps=a.vae_steps,
        unet_steps=a.unet_steps,
        classifier_steps=a.classifier_steps,
        num_images=a.num_images,
        vae_minutes=a.vae_minutes,
        unet_minutes=a.unet_minutes,
        batch_size=a.batch_size,
        vae_batch_size=a.vae_batch_size,
        threads=a.threads,
        seed=a.seed,
    )
    if a.tiny:
        cfg.vae_channels, cfg.unet_channels, cfg.text_hidden, cfg.text_layers = (8, 8, 8), (8, 16), 16, 1
    log = lambda s: print(s, flush=True)  # noqa: E731
    if a.grid_only is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(teacher_grid(a.grid_only, a.out / "teacher_grid.png")):
            log(f"column {i + 1}: {prompt}")
        return 0
    if a.classifier_only:
        a.out.mkdir(parents=True, exist_ok=True)
        acc = train_and_save_classifier(a.out, cfg, log)
        (a.out / "caption_classifier_info.json").write_text(json.dumps({"held_out": acc, "steps": cfg.classifier_steps}) + "\n")
        return 0
    train_teacher(a.out, cfg, log=log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
