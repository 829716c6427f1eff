"""The measurement passes of `fastlcm bench step` (see fastlcm.bench.step): warm-up, steady-state steps timed end to
end, and an instrumented pass that synchronizes around each part of the step to attribute time to it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

PARTS = ("loader_wait", "vae_encode", "text_encode", "teacher_forward", "target_forward", "student_forward_backward",
         "optimizer", "ema", "other")  # fmt: skip
PARTS_NOTE = ("parts: seconds per step from a separate instrumented pass that synchronizes the device around each "
              "part (no CPU/GPU overlap), so they sum to instrumented_step_s, not to step_s; loader_wait includes "
              "the host-to-device copy; other = LCD elementwise math, random draws and the trainer's loss sync")  # fmt: skip



class Clock:
    """Accumulates seconds per part; with ``sync`` it synchronizes the device before and after each part."""

    def __init__(self, device, sync: bool):
        self.device, self.sync, self.parts = device, sync, dict.fromkeys(PARTS, 0.0)

    def _sync(self) -> None:
        import torch

        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def part(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.parts[name] += time.perf_counter() - t0


def _timed_call(fn, clock: Clock, name: str):
    def call(*args, **kwargs):
        with clock.part(name):
            return fn(*args, **kwargs)

    return call


class _TimedVAE:
    def __init__(self, vae, clock: Clock):
        self._vae, self._clock = vae, clock

    def parameters(self):
        return self._vae.parameters()

    def encode(self, x):
        with self._clock.part("vae_encode"):
            return self._vae.encode(x)


class _TimedText:
    def __init__(self, text, clock: Clock):
        self._text, self._clock = text, clock

    def encode(self, captions, batch=None):
        with self._clock.part("text_encode"):
            return self._text.encode(captions, batch)

    def unconditional(self, batch_size, batch=None):
        with self._clock.part("text_encode"):
            return self._text.unconditional(batch_size, batch)


def instrumented(lcd_models, clock: Clock):
    return dataclasses.replace(
        lcd_models, vae=_TimedVAE(lcd_models.vae, clock), text=_TimedText(lcd_models.text, clock),
        student=_timed_call(lcd_models.student, clock, "student_forward_backward"),
        teacher=_timed_call(lcd_models.teacher, clock, "teacher_forward"),
        target=_timed_call(lcd_models.target, clock, "target_forward"),
    )  # fmt: skip


def _step(st, batches, lcd_models=None, clock: Clock | None = None) -> float:
    """One training.step.train_step (gradient accumulation 1, one process); the loader wait is timed as a part too."""
    from fastlcm.training.step import train_step

    part = clock.part if clock is not None else None
    with (part("loader_wait") if part else contextlib.nullcontext()):
        batch = next(batches)
    # random weights can give a non-finite loss: count it (the trainer would stop) instead of raising
    return train_step(st, batch, part=part, lcd_models=lcd_models, check_finite=False)


def measure(st, batches, args) -> dict:
    import torch

    device = st.accelerator.device
    cuda = device.type == "cuda"
    losses = []
    cache = None  # what the warm-up's torch.compile starts from: "cold" (nothing cached) or "warm (N files)"
    if st.cfg.compile_unets != "none":
        from fastlcm.training.compile import compile_cache_state

        cache = compile_cache_state()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(_step(st, batches))
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(_step(st, batches))
    if cuda:
        end.record()
        end.synchronize()
        step_s = start.elapsed_time(end) / 1e3 / args.steps
    else:
        step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    clock = Clock(device, sync=True)
    models_i = instrumented(st.lcd_models, clock)
    t_total = 0.0
    for _ in range(args.parts_steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(_step(st, batches, models_i, clock))
        if cuda:
            torch.cuda.synchronize(device)
        t_total += time.perf_counter() - t0
    n = max(args.parts_steps, 1)
    parts = {k: v / n for k, v in clock.parts.items()}
    # student_forward_backward also holds the student's forward, timed inside lcd_step by the wrapper
    parts["other"] = max(0.0, t_total / n - sum(v for k, v in parts.items() if k != "other"))
    return {"step_s": step_s, "samples_per_s": args.batch_size / step_s, "peak_mem_gib": peak, "warmup_s": warmup_s,
            "compile_cache": cache,
            "instrumented_step_s": t_total / n if args.parts_steps else None,
            "parts": {k: round(v, 6) for k, v in parts.items()} if args.parts_steps else {},
            "nonfinite_losses": sum(not math.isfinite(v) for v in losses)}  # fmt: skip
