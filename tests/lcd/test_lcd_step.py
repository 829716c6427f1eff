"""`fastlcm.lcd.step.lcd_step` against an independent, straightforward implementation of DESIGN.md's numbered
LCD algorithm written here with plain tensor arithmetic (no fastlcm.lcd.math), on fixed tensors and tiny nets.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastlcm.lcd.math import SolverGrid
from fastlcm.lcd.step import Conditioning, LCDModels, LCDSettings, lcd_step
from fastlcm.training.models import build_student, build_target

T, N, D, LAM = 1000, 50, 8, 10.0
SCALING = 0.18215


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def _tiny_unet(time_cond_proj_dim=None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        time_cond_proj_dim=time_cond_proj_dim,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=SCALING,
    )


class FixedText:
    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def encode(self, captions, batch=None):
        assert len(captions) == self.cond.shape[0]
        return Conditioning(self.cond)

    def unconditional(self, batch_size, batch=None):
        return Conditioning(self.uncond.expand(batch_size, -1, -1))


class FixedDraws:
    def __init__(self, latent_noise, index, noise, w):
        self.values = {"latent_noise": latent_noise, "index": index, "noise": noise, "w": w}
        self.cursor = 0

    def latent_noise(self, shape):  # consecutive rows, one call per VAE chunk
        rows = self.values["latent_noise"][self.cursor : self.cursor + shape[0]]
        assert tuple(rows.shape) == tuple(shape)
        self.cursor += shape[0]
        return rows

    def grid_index(self, batch_size, n):
        assert n == N
        return self.values["index"]

    def noise(self, shape):
        return self.values["noise"]

    def guidance(self, batch_size, w_min, w_max):
        w = self.values["w"]
        assert bool(((w >= w_min) & (w <= w_max)).all())
        return w


# ---- the independent reference: DESIGN.md steps 1–12 written out directly ----


def reference_loss(pixels, cond, uncond, nets, ac, draws, ptype, loss_type, huber_c):
    vae, teacher, student, target = nets
    v = draws.values
    col = lambda x: x.reshape(-1, 1, 1, 1).float()  # noqa: E731  (per-sample scalars → fp32 columns)
    # 1
    with torch.no_grad():
        post = vae.encode(pixels).latent_dist
        z0 = (post.mean + torch.exp(0.5 * post.logvar) * v["latent_noise"]) * SCALING
    # 3
    k = T // N
    t = (v["index"] + 1) * k - 1
    s = torch.where(t - k < 0, torch.zeros_like(t), t - k)
    # 4
    a_t, g_t = col(ac[t].sqrt()), col((1 - ac[t]).sqrt())
    z_t = a_t * z0 + g_t * v["noise"]
    # 5
    w = v["w"]
    j = torch.arange(D // 2, dtype=torch.float32)
    freq = torch.exp(-math.log(10000.0) * j / (D // 2 - 1))
    emb = torch.cat([torch.sin(1000 * w[:, None] * freq), torch.cos(1000 * w[:, None] * freq)], 1)

    # 6
    def c_skip(u):
        return col(0.25 / ((LAM * u.double()) ** 2 + 0.25))

    def c_out(u):
        return col(LAM * u.double() / ((LAM * u.double()) ** 2 + 0.25).sqrt())

    # 7
    def x0_of(m, z, a, g):
        return (z - g * m) / a if ptype == "epsilon" else a * z - g * m

    def eps_of(m, z, a, g):
        return m if ptype == "epsilon" else a * m + g * z

    # 8
    m_s = student(z_t, t, encoder_hidden_states=cond, timestep_cond=emb).sample
    f_theta = c_skip(t) * z_t + c_out(t) * x0_of(m_s, z_t, a_t, g_t)
    with torch.no_grad():
        # 9 (two separate forwards here; the step batches them)
        m_c = teacher(z_t, t, encoder_hidden_states=cond).sample
        m_u = teacher(z_t, t, encoder_hidden_states=uncond.expand_as(cond)).sample
        x0c, x0u = x0_of(m_c, z_t, a_t, g_t), x0_of(m_u, z_t, a_t, g_t)
        ec, eu = eps_of(m_c, z_t, a_t, g_t), eps_of(m_u, z_t, a_t, g_t)
        x0 = x0c + col(w) * (x0c - x0u)
        eps = ec + col(w) * (ec - eu)
        # 10: ᾱ_prev(i) = ᾱ[τ_{i-1}] = ᾱ[t − k], ᾱ[0] at i = 0
        prev = col(torch.where(v["index"] == 0, ac[0], ac[(t - k).clamp_min(0)]))
        z_s = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
        # 11
        a_s, g_s = col(ac[s].sqrt()), col((1 - ac[s]).sqrt())
        m_t = target(z_s, s, encoder_hidden_states=cond, timestep_cond=emb).sample
        f_minus = c_skip(s) * z_s + c_out(s) * x0_of(m_t, z_s, a_s, g_s)
    # 12
    d = f_theta - f_minus
    if loss_type == "l2":
        return (d**2).mean()
    return (torch.sqrt(d**2 + huber_c**2) - huber_c).mean()


def _setup(batch_size, index, w, ptype, seed=0):
    torch.manual_seed(seed)
    vae, teacher = _tiny_vae().eval(), _tiny_unet().eval()
    student = build_student(teacher, D)
    target = build_target(student)
    with torch.no_grad():  # a target that differs from the student, as after some EMA steps
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pixels = torch.rand(batch_size, 3, 64, 64) * 2 - 1
    cond, uncond = torch.randn(batch_size, 7, 16), torch.randn(1, 7, 16)
    draws = FixedDraws(torch.randn(batch_size, 4, 8, 8), torch.tensor(index), torch.randn(batch_size, 4, 8, 8),
                       torch.tensor(w, dtype=torch.float32))
    models = LCDModels(vae=vae, text=FixedText(cond, uncond), student=student, teacher=teacher, target=target,
                       prediction_type=ptype, scaling_factor=SCALING)
    return pixels, cond, uncond, (vae, teacher, student, target), models, draws


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


CASES = [
    # (batch, grid indices, w, loss) — general, first grid point (s = 0), w at w_min / w_max, batch of 1
    (3, [17, 0, 49], [6.25, 5.0, 15.0], "l2"),
    (3, [3, 25, 48], [7.5, 11.0, 14.0], "huber"),
    (1, [0], [15.0], "huber"),
    (1, [30], [5.0], "l2"),
]


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("batch,index,w,loss_type", CASES)
@pytest.mark.parametrize("cfg_batched", [True, False], ids=["cfg-2B", "cfg-split"])
def test_step_matches_independent_reference(ptype, batch, index, w, loss_type, cfg_batched):
    """Against an independent composition of the DESIGN.md math, with the teacher's guidance computed from one
    forward at 2B (the default) and from two forwards at B (the bench's ablation of that lever)."""
    pixels, cond, uncond, nets, models, draws = _setup(batch, index, w, ptype)
    settings = LCDSettings(w_min=5.0, w_max=15.0, guidance_dim=D, timestep_scaling=LAM, loss_type=loss_type,
                           huber_c=0.001, vae_encode_batch_size=2,  # 2 < batch: chunked VAE encode
                           teacher_cfg_batched=cfg_batched)  # fmt: skip
    ac = _alphas_cumprod()
    grid = SolverGrid.build(ac, N)

    out = lcd_step(pixels, ["x"] * batch, models, grid, settings, draws)
    out.backward()
    got = _grads(nets[2])
    nets[2].zero_grad(set_to_none=True)

    ref = reference_loss(pixels, cond, uncond, nets, ac, draws, ptype, loss_type, 0.001)
    ref.backward()
    want = _grads(nets[2])

    assert out.dtype == torch.float32 and out.ndim == 0
    assert torch.isfinite(out) and out.item() > 0
    torch.testing.assert_close(out, ref.float(), rtol=2e-5, atol=1e-7)
    assert set(got) == set(want) and "time_embedding.cond_proj.weight" in got
    # Both fp32 with different summation orders; compare each tensor relative to its largest entry. The
    # pseudo-Huber gradient d/√(d² + c²) turns an fp32 rounding of d (~1e-7) into a relative error ~1e-7/c,
    # so with c = 0.001 the bound is looser than for L2.
    tol = 5e-5 if loss_type == "l2" else 5e-4
    for name in want:
        scale = want[name].abs().max().item() + 1e-12
        assert (got[name] - want[name].float()).abs().max().item() <= tol * scale, name
    # the frozen nets get no gradients
    assert not any(p.grad is not None for net in (nets[0], nets[1], nets[3]) for p in net.parameters())


def test_first_grid_point_target_is_the_solver_output():
    """At i = 0, s = 0 so c_skip(s) = 1, c_out(s) = 0: f⁻ is z_s itself, whatever the target predicts."""
    from fastlcm.lcd.math import boundary_scalings

    c_skip, c_out = boundary_scalings(torch.tensor([0]), LAM)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    pixels, cond, uncond, nets, models, draws = _setup(2, [0, 0], [5.0, 15.0], "epsilon")
    grid = SolverGrid.build(_alphas_cumprod(), N)
    settings = LCDSettings(guidance_dim=D, loss_type="l2")
    base = lcd_step(pixels, ["x", "y"], models, grid, settings, draws).item()
    draws.cursor = 0
    with torch.no_grad():  # a wildly different target changes nothing at s = 0
        for p in nets[3].parameters():
            p.mul_(-3.0)
    assert lcd_step(pixels, ["x", "y"], models, grid, settings, draws).item() == pytest.approx(base, rel=1e-6)


# ---- cached latents (fastlcm precompute → --precomputed_latents): the same loss as the image path ----


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cached_latents_give_the_image_path_loss(tiny_teacher_factory, family):
    """A LatentBatch-like object (duck-typed fields of the contract: unscaled posterior mean/std, the captions'
    prompt embeddings, SDXL pooled embeddings, sizes and crops) built from the same crops gives the same loss as the
    image path with the same draws — including a caption dropped by --proportion_empty_prompts, which the image
    path encodes as "" and the latent path must replace (its batch holds the original caption's embedding)."""
    from types import SimpleNamespace

    from fastlcm.config import TrainConfig
    from fastlcm.families import load_teacher
    from fastlcm.lcd.step import TorchDraws
    from fastlcm.training.models import PrecomputedConditioner

    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher_factory(family, "epsilon")), resolution=64)
    teacher = load_teacher(cfg.teacher_source())
    torch.manual_seed(0)
    student = build_student(teacher.unet, D)
    target = build_target(student)
    text = teacher.conditioner("cpu", cfg.resolution)
    grid = SolverGrid.build(teacher.noise_scheduler.alphas_cumprod.to(torch.float64), N)
    settings = LCDSettings(w_min=3.0, w_max=8.0, guidance_dim=D, loss_type="huber", vae_encode_batch_size=2)
    captions = ["a red circle", "a blue square", "a photo of a cat"]
    dropped = ["a red circle", "", "a photo of a cat"]  # what drop_captions hands the step
    sizes, crops = torch.tensor([[64, 80], [96, 64], [64, 64]]), torch.tensor([[0, 7], [15, 0], [0, 0]])
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    image_batch = SimpleNamespace(original_sizes=sizes, crop_coords=crops)
    nets = LCDModels(vae=teacher.vae, text=text, student=student, teacher=teacher.unet, target=target,
                     prediction_type=teacher.prediction_type, scaling_factor=teacher.vae.config.scaling_factor)
    image_loss = lcd_step(pixels, dropped, nets, grid, settings, TorchDraws("cpu", 5), image_batch)

    with torch.no_grad():  # what `fastlcm precompute` stores for these crops (posterior per VAE chunk, as encoded)
        posts = [teacher.vae.encode(part).latent_dist for part in pixels.split(2)]
        cond = text.encode(captions, image_batch)
    latent_batch = SimpleNamespace(
        latent_mean=torch.cat([p.mean for p in posts]), latent_std=torch.cat([p.std for p in posts]),
        prompt_embeds=cond.prompt_embeds.float(),
        pooled_embeds=cond.added["text_embeds"].float() if cond.added else None,
        original_sizes=sizes, crop_coords=crops, captions=captions)
    cached = LCDModels(vae=None, text=PrecomputedConditioner(text, teacher.family.cached_fields), student=student, teacher=teacher.unet,
                       target=target, prediction_type=teacher.prediction_type,
                       scaling_factor=teacher.vae.config.scaling_factor)
    latent_loss = lcd_step(None, dropped, cached, grid, settings, TorchDraws("cpu", 5), latent_batch)
    torch.testing.assert_close(latent_loss, image_loss, rtol=1e-5, atol=1e-7)
    # the replacement matters: without it (the original caption's embedding) the loss differs
    plain = lcd_step(None, captions, cached, grid, settings, TorchDraws("cpu", 5), latent_batch)
    assert not torch.allclose(plain, image_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_split_teacher_cfg_gives_the_batched_loss(tiny_teacher_factory, family):
    """The bench's ablation of the 2B teacher forward (two B forwards, as diffusers' script) is the same math, also
    with SDXL's added conditioning (pooled embeddings and time ids split with the prompt embeddings)."""
    import dataclasses
    from types import SimpleNamespace

    from fastlcm.config import TrainConfig
    from fastlcm.families import load_teacher
    from fastlcm.lcd.step import TorchDraws
    from fastlcm.training.models import PrecomputedConditioner

    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher_factory(family, "epsilon")), resolution=64)
    teacher = load_teacher(cfg.teacher_source())
    torch.manual_seed(0)
    student = build_student(teacher.unet, D)
    nets = LCDModels(vae=teacher.vae, text=teacher.conditioner("cpu", cfg.resolution), student=student,
                     teacher=teacher.unet, target=build_target(student), prediction_type=teacher.prediction_type,
                     scaling_factor=teacher.vae.config.scaling_factor)  # fmt: skip
    grid = SolverGrid.build(teacher.noise_scheduler.alphas_cumprod.to(torch.float64), N)
    batched = LCDSettings(w_min=3.0, w_max=8.0, guidance_dim=D, loss_type="huber")
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batch = SimpleNamespace(original_sizes=torch.tensor([[64, 80], [96, 64], [64, 64]]),
                            crop_coords=torch.tensor([[0, 7], [15, 0], [0, 0]]))  # fmt: skip
    captions = ["a red circle", "", "a photo of a cat"]
    losses = [lcd_step(pixels, captions, nets, grid, s, TorchDraws("cpu", 7), batch)
              for s in (batched, dataclasses.replace(batched, teacher_cfg_batched=False))]  # fmt: skip
    assert losses[0].item() > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-7)
