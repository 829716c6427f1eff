"""Kernels on vs off over real LCD training steps: the loss curves must agree.

The steps follow DESIGN.md "The LCD step" with a tiny random-weight teacher UNet (fastlcm.testing), a student
rebuilt with a guidance projection (full distillation) and an EMA target, composed directly from fastlcm.lcd.math
and fastlcm.kernels (the trainer is not needed). The same seeded run is made with FASTLCM_KERNELS=triton and
=torch. GPU tier: 20 steps on CUDA (compiled kernels). The ``slow`` CPU variant (about 6 s on an idle 2-core box)
runs 3 steps with the kernels under the Triton interpreter, which keeps this loop itself tested without a GPU.
A uniform scale error in the student gradient would be hidden by grad-norm clipping here; test_kernels.py
checks gradients directly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastlcm import kernels
from fastlcm.lcd import math as lcd_math

pytest.importorskip("triton")
pytest.importorskip("diffusers")

GUIDANCE_DIM = 256
W_MIN, W_MAX = 3.0, 15.0
LR = 0.1
"""Plain SGD: with Adam or momentum, rounding-level differences grow chaotically on this random-weight model
(measured on CPU: 2e-3 relative after 20 AdamW steps at lr 1e-4); SGD keeps them at rounding level (< 1e-6 over
12 steps), so the comparison can be tight while every step still moves the weights by up to LR (grad norm ≤ 1)."""


def lcd_loss_curve(teacher_dir, device: str, backend: str, monkeypatch, steps: int, loss_type: str) -> list[float]:
    """Losses of ``steps`` full-distillation LCD steps with ``FASTLCM_KERNELS=backend``; everything else seeded."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    monkeypatch.setenv(kernels.KERNELS_ENV, backend)
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir / "unet").to(device).eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(teacher_dir / "scheduler")
    prediction_type = scheduler.config.prediction_type
    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": GUIDANCE_DIM})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing)
    student = student.to(device).train()
    target = copy.deepcopy(student).requires_grad_(False)
    grid = lcd_math.SolverGrid.build(scheduler.alphas_cumprod.double(), 50).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)

    data = torch.Generator().manual_seed(1234)  # CPU stream: identical batches whatever the backend/device
    batch, size, hidden = 4, teacher.config.sample_size, teacher.config.cross_attention_dim
    f32 = lambda v: v.to(device=device, dtype=torch.float32)  # noqa: E731
    losses = []
    for _ in range(steps):
        z0 = f32(torch.randn(batch, 4, size, size, generator=data))  # 1. latents (random: no VAE needed here)
        text = f32(torch.randn(batch, 8, hidden, generator=data))  # 2. c, and c∅ = zeros
        uncond = torch.zeros_like(text)
        index = torch.randint(0, 50, (batch,), generator=data).to(device)  # 3.
        t, s = grid.t_and_s(index)
        noise = f32(torch.randn(z0.shape, generator=data))  # 4.
        alpha_t, sigma_t = (f32(v) for v in grid.alpha_sigma(t))
        z_t = lcd_math.per_sample(alpha_t, 4) * z0 + lcd_math.per_sample(sigma_t, 4) * noise
        w = f32(torch.rand(batch, generator=data) * (W_MAX - W_MIN) + W_MIN)  # 5.
        w_emb = lcd_math.guidance_embedding(w, GUIDANCE_DIM)
        c_skip_t, c_out_t = (f32(v) for v in lcd_math.boundary_scalings(t))  # 6.
        c_skip_s, c_out_s = (f32(v) for v in lcd_math.boundary_scalings(s))

        student_out = student(z_t, t, encoder_hidden_states=text, timestep_cond=w_emb).sample  # 8.
        f_theta = kernels.boundary_output(student_out, z_t, alpha_t, sigma_t, c_skip_t, c_out_t, prediction_type)
        with torch.no_grad():
            teacher_out = teacher(  # 9. one forward over [c; c∅]
                torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text, uncond])
            ).sample
            alpha_prev = f32(grid.alpha_cumprod_prev[index])
            z_s = kernels.solver_step(teacher_out, z_t, alpha_t, sigma_t, alpha_prev, w, prediction_type)  # 10.
            alpha_s, sigma_s = (f32(v) for v in grid.alpha_sigma(s))
            target_out = target(z_s, s, encoder_hidden_states=text, timestep_cond=w_emb).sample  # 11.
            f_minus = kernels.boundary_output(target_out, z_s, alpha_s, sigma_s, c_skip_s, c_out_s, prediction_type)
        loss = kernels.consistency_loss(f_theta, f_minus, loss_type, 0.001)  # 12.
        loss.backward()  # 13.
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lcd_math.ema_update(target.parameters(), student.parameters(), 0.95)  # 14.
        losses.append(loss.item())
    return losses


def compare_curves(teacher_dir, device, monkeypatch, steps, loss_type, rtol):
    launched: dict[str, int] = {}
    original = kernels.dispatch.TritonKernel.__getitem__

    def counting(self, grid):
        launched[self.__name__] = launched.get(self.__name__, 0) + 1
        return original(self, grid)

    with monkeypatch.context() as m:
        m.setattr(kernels.dispatch.TritonKernel, "__getitem__", counting)
        on = lcd_loss_curve(teacher_dir, device, "triton", monkeypatch, steps, loss_type)
    off = lcd_loss_curve(teacher_dir, device, "torch", monkeypatch, steps, loss_type)
    # Per step: the student and target boundary outputs, the solver, the fused loss and its backward, f_θ backward.
    assert launched == {
        "_boundary_fwd_kernel": 2 * steps,
        "_boundary_bwd_kernel": steps,
        "_solver_kernel": steps,
        "_loss_fwd_kernel": steps,
        "_scale_inplace_kernel": steps,  # fp32 gradient: scaled in place
    }
    assert all(math.isfinite(v) for v in on + off)
    assert len(set(off)) > 1, "the loss curve should move"
    worst = max(abs(a - b) / abs(b) for a, b in zip(on, off))
    print(f"{device}: kernels on {on}\n{device}: kernels off {off}\nmax relative difference {worst:.3g}")
    assert worst <= rtol, f"kernels on vs off: max relative loss difference {worst:.3g} > {rtol}\non={on}\noff={off}"


@pytest.mark.gpu
@pytest.mark.parametrize("prediction_type,loss_type", [("epsilon", "huber"), ("v_prediction", "l2")])
def test_loss_curve_kernels_on_vs_off_cuda(tiny_teacher_factory, monkeypatch, prediction_type, loss_type):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # Same convolution algorithms in both runs, no TF32: the runs then differ only in the kernels' rounding.
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    try:
        teacher = tiny_teacher_factory("sd", prediction_type)
        compare_curves(teacher, "cuda", monkeypatch, steps=20, loss_type=loss_type, rtol=1e-4)
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.mark.slow
def test_loss_curve_kernels_on_vs_off_cpu_interpreter(tiny_teacher_factory, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny UNet gains nothing from threads; on a loaded 2-core box they cost 5x
    try:
        teacher = tiny_teacher_factory("sd", "epsilon")
        compare_curves(teacher, "cpu", monkeypatch, steps=3, loss_type="huber", rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
