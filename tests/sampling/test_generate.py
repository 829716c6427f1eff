"""`fastlcm generate`: full-distilled UNets and LCM-LoRAs on SD and SDXL teachers; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastlcm.cli import main
from fastlcm.sampling.student import student_from_teacher
from fastlcm.demo.procedural import TINY_TEACHER

PROMPT = "a red circle at the top left on a black background"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _student_dir(teacher, out, dim=32):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", torch_dtype=torch.float32)
    student_from_teacher(unet, out, time_cond_proj_dim=dim)
    return out


@pytest.fixture(scope="module")
def shipped_student(tmp_path_factory):
    if not (TINY_TEACHER / "model_index.json").is_file():
        pytest.fail(f"the shipped tiny teacher is missing: {TINY_TEACHER}")
    return _student_dir(TINY_TEACHER, tmp_path_factory.mktemp("student"))


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_generate_with_distilled_unet_on_default_teacher(shipped_student, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--unet", str(shipped_student), "--prompt", PROMPT, "--steps", "2", "--out", str(out)]) == 0
    img = _png(out)
    assert img.shape == (64, 64, 3) and img.std() > 0
    assert "wrote" in capsys.readouterr().out
    # Same seed → same image; several prompts → side by side.
    again = tmp_path / "y.png"
    main(["generate", "--unet", str(shipped_student), "--prompt", PROMPT, "--steps", "2", "--out", str(again)])
    assert np.array_equal(_png(again), img)
    two = tmp_path / "two.png"
    assert main(["generate", "--teacher", str(TINY_TEACHER), "--unet", str(shipped_student), "--prompt", PROMPT,
                 "--prompt", "a blue square in the center on a gray background", "--steps", "1", "--seed", "3",
                 "--out", str(two)]) == 0
    assert _png(two).shape == (64, 128, 3)


def test_generate_sdxl_teacher_uses_sdxl_pipeline(tiny_teacher_factory, tmp_path):
    teacher = tiny_teacher_factory("sdxl", "epsilon")
    assert json.loads((teacher / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    student = _student_dir(teacher, tmp_path / "student", dim=16)
    out = tmp_path / "xl.png"
    assert main(["generate", "--teacher", str(teacher), "--unet", str(student), "--prompt", "a red circle",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)]) == 0
    assert _png(out).shape == (64, 64, 3)


def _lora(out, init_lora_weights):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(TINY_TEACHER, subfolder="unet", torch_dtype=torch.float32)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=init_lora_weights,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return out


def test_generate_with_lora(tmp_path):
    """A LoRA saved the way diffusers' training scripts save it changes the output; a zero LoRA does not."""
    plain_unet = _student_dir(TINY_TEACHER, tmp_path / "plain_unet")  # the teacher UNet, zero guidance projection
    common = ["--prompt", PROMPT, "--steps", "2", "--guidance", "1.0"]
    outs = {}
    for name, flag in (("random", ["--lora", str(_lora(tmp_path / "random", False))]),
                       ("zero", ["--lora", str(_lora(tmp_path / "zero", True))]),
                       ("none", ["--unet", str(plain_unet)])):
        outs[name] = tmp_path / f"{name}.png"
        assert main(["generate", *flag, *common, "--out", str(outs[name])]) == 0
    assert _png(outs["random"]).shape == (64, 64, 3)
    assert np.array_equal(_png(outs["zero"]), _png(outs["none"]))
    assert np.abs(_png(outs["random"]).astype(int) - _png(outs["none"]).astype(int)).max() > 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--unet", "{tmp}/missing"], "--unet"),
        (["--teacher", "{tmp}", "--unet", "{tmp}"], "--teacher"),
        (["--lora", "{tmp}/missing"], "--lora"),
        (["--unet", "{student}", "--steps", "0"], "--steps"),
        (["--unet", "{student}", "--height", "60"], "--height"),
        (["--unet", "{student}", "--out", "{tmp}/x.gif"], "--out"),
        (["--unet", "{plain}"], "time_cond_proj_dim"),
    ],
)
def test_errors_name_the_flag(shipped_student, tmp_path, capsys, argv, needle):
    from diffusers import UNet2DConditionModel

    plain = tmp_path / "plain"
    if "{plain}" in argv:
        UNet2DConditionModel.from_pretrained(TINY_TEACHER, subfolder="unet").save_pretrained(plain)
    argv = [a.format(tmp=tmp_path, student=shipped_student, plain=plain) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    assert main(["generate", "--prompt", PROMPT, *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unet_and_lora_are_exclusive_and_one_is_required(tmp_path):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        main(["generate", "--unet", "a", "--lora", "b", "--prompt", PROMPT, "--out", str(tmp_path / "x.png")])
