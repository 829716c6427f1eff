"""The trainer on CUDA in mixed precision (opt-in: -m gpu; slow CPU variant: -m slow)."""

from __future__ import annotations

import json

import pytest
import torch

from test_train import FakeLoader, _cfg, shards  # noqa: F401  (fixture re-used)

from fastlcm.train import train


def _run(teacher, shards, out, precision, *extra):
    cfg = _cfg(teacher, shards, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "3",
               "--mixed_precision", precision, "--export_pipeline", *extra)
    summary = train(cfg, loader_factory=FakeLoader)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and len(rows) == 3
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert (out / "checkpoint-2" / "fastlcm_state.json").is_file() and (out / "pipeline" / "model_index.json").is_file()
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("precision,extra", [("fp16", ()), ("fp16", ("--cast_teacher_unet",)), ("bf16", ("--allow_tf32",))])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_mixed_precision_on_cuda(tiny_teacher_factory, shards, tmp_path, precision, extra, ptype):  # noqa: F811
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run(tiny_teacher_factory("sd", ptype), shards, tmp_path, precision, *extra, "--gradient_checkpointing")


@pytest.mark.slow
def test_bf16_autocast_on_cpu(tiny_teacher_factory, shards, tmp_path):  # noqa: F811
    _run(tiny_teacher_factory("sd", "v_prediction"), shards, tmp_path, "bf16")


# ---- LCM-LoRA and SDXL in mixed precision (SDXL with --use_fix_crop_and_size: FakeLoader has no sizes/crops) ----

LORA = ("--lora_rank", "4")
SDXL_FIX = ("--use_fix_crop_and_size",)


@pytest.mark.gpu
@pytest.mark.parametrize("family,extra", [("sd", LORA), ("sdxl", SDXL_FIX), ("sdxl", SDXL_FIX + LORA)])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lora_and_sdxl_mixed_precision_on_cuda(tiny_teacher_factory, shards, tmp_path, family, extra,  # noqa: F811
                                               precision):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run(tiny_teacher_factory(family, "epsilon"), shards, tmp_path, precision, *extra, "--gradient_checkpointing")


@pytest.mark.slow
@pytest.mark.parametrize("family,extra", [("sd", LORA), ("sdxl", SDXL_FIX + LORA)])
def test_lora_and_sdxl_bf16_autocast_on_cpu(tiny_teacher_factory, shards, tmp_path, family, extra):  # noqa: F811
    _run(tiny_teacher_factory(family, "epsilon"), shards, tmp_path, "bf16", *extra)
