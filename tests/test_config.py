"""TrainConfig: diffusers flag names and defaults, TOML config + CLI override, presets, one-line validation errors."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from fastlcm import _native
from fastlcm.cli.flags import field_docs, load_config, preset_names, read_toml
from fastlcm.config import TrainConfig
from fastlcm.errors import ConfigError
from fastlcm.families import get_family

# name → default in diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py
DIFFUSERS_FLAGS = {
    "pretrained_teacher_model": None, "teacher_revision": None, "revision": None,
    "pretrained_vae_model_name_or_path": None, "output_dir": "lcm-xl-distilled", "cache_dir": None, "seed": None,
    "resolution": 512, "interpolation_type": "bilinear", "center_crop": False, "random_flip": False,
    "train_shards_path_or_url": None, "max_train_samples": None, "train_batch_size": 16, "num_train_epochs": 100,
    "max_train_steps": None, "dataloader_num_workers": 0, "learning_rate": 1e-4, "scale_lr": False,
    "lr_scheduler": "constant", "lr_warmup_steps": 500, "use_8bit_adam": False, "adam_beta1": 0.9,
    "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-08, "max_grad_norm": 1.0,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "mixed_precision": None,
    "allow_tf32": False, "cast_teacher_unet": False, "enable_xformers_memory_efficient_attention": False,
    "w_min": 5.0, "w_max": 15.0, "num_ddim_timesteps": 50, "loss_type": "l2", "huber_c": 0.001,
    "timestep_scaling_factor": 10.0, "unet_time_cond_proj_dim": 256, "ema_decay": 0.95,
    "vae_encode_batch_size": 32, "proportion_empty_prompts": 0, "checkpointing_steps": 500,
    "checkpoints_total_limit": None, "resume_from_checkpoint": None, "validation_steps": 200,
    "report_to": "tensorboard", "tracker_project_name": "text2image-fine-tune", "logging_dir": "logs",
    "push_to_hub": False, "hub_token": None, "hub_model_id": None, "local_rank": -1,
}


@pytest.fixture
def basics(tmp_path, tiny_sd_teacher):
    from fastlcm.testing import make_tiny_shards

    make_tiny_shards(tmp_path / "shards", num_samples=4, samples_per_shard=2)
    return ["--pretrained_teacher_model", str(tiny_sd_teacher),
            "--train_shards_path_or_url", str(tmp_path / "shards" / "shard-{00000..00001}.tar")]


def test_every_diffusers_flag_with_its_default():
    # w_min's default depends on the teacher's family (5 for SD as in the sd script, 3 for SDXL): resolved
    # once the family is known, left None until then.
    defaults = TrainConfig().with_family_defaults(get_family("sd"))
    for name, default in DIFFUSERS_FLAGS.items():
        assert getattr(defaults, name) == default, name
    assert TrainConfig().w_min is None and TrainConfig().with_family_defaults(get_family("sdxl")).w_min == 3.0
    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not docs.get(f.name)]
    assert missing == []


def test_cli_flags_parse_like_diffusers(basics):
    cfg = load_config(basics + ["--center_crop", "--random_flip", "--scale_lr", "--w_min=3", "--w_max", "9.5",
                                "--mixed_precision", "bf16", "--loss_type=huber", "--dataloader_num_workers", "3",
                                "--validation_prompts", "a cat", "a dog"])
    assert cfg.center_crop and cfg.random_flip and cfg.scale_lr
    assert (cfg.w_min, cfg.w_max, cfg.mixed_precision, cfg.loss_type) == (3.0, 9.5, "bf16", "huber")
    assert cfg.loader_threads == 3 and TrainConfig().loader_threads is None
    assert cfg.validation_prompts == ["a cat", "a dog"]


def test_config_file_then_flags_override(tmp_path, basics):
    toml = tmp_path / "run.toml"
    toml.write_text('learning_rate = 3e-6\nresolution = 256\ncenter_crop = true\nloss_type = "huber"\nw_max = 12\n')
    cfg = load_config(["--config", str(toml), "--resolution", "128", "--no-center_crop"] + basics)
    assert cfg.learning_rate == 3e-6 and cfg.loss_type == "huber" and cfg.w_max == 12.0
    assert cfg.resolution == 128 and cfg.center_crop is False  # flags win


@pytest.mark.parametrize("text,needle", [("bogus_key = 1\n", "unknown key 'bogus_key'"),
                                         ('resolution = "big"\n', "key 'resolution' must be int"),
                                         ("resolution = [\n", "invalid TOML")])
def test_bad_config_file(tmp_path, text, needle):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        read_toml(toml)


def test_presets_are_packaged_and_parse():
    assert {"sd15", "sd21"} <= set(preset_names())
    sd15, sd21 = TrainConfig(**read_toml("sd15")), TrainConfig(**read_toml("sd21"))
    assert sd15.resolution == 512 and sd21.resolution == 768
    assert "stable-diffusion-2-1" in sd21.pretrained_teacher_model and sd21.mixed_precision == "bf16"
    for cfg in (sd15, sd21):
        assert cfg.loss_type == "huber" and cfg.unet_time_cond_proj_dim == 256


def test_preset_by_name_with_overrides(basics):
    cfg = load_config(["--config", "sd21", "--resolution", "64"] + basics)
    assert cfg.resolution == 64 and cfg.mixed_precision == "bf16" and cfg.learning_rate == 1e-6


@pytest.mark.parametrize("extra,needle", [
    (["--resolution", "100"], "--resolution must be a positive multiple of 8"),
    (["--w_min", "9", "--w_max", "3"], "--w_min (9.0) must not exceed --w_max (3.0)"),
    (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts must be in [0, 1]"),
    (["--lr_scheduler", "cosine"], "--lr_scheduler cosine needs the run length"),
    (["--report_to", "wandb", "--hub_token", "x"], "--hub_token cannot be used"),
    (["--unet_time_cond_proj_dim", "7"], "--unet_time_cond_proj_dim must be even"),
    (["--precomputed_latents", "--loader_dtype", "uint8"], "--loader_dtype uint8 is for image shards"),
])
def test_bad_values_name_the_flag(basics, extra, needle):
    with pytest.raises(ConfigError) as e:
        load_config(basics + extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_inputs(tmp_path, basics):
    with pytest.raises(ConfigError, match="--pretrained_teacher_model is required"):
        load_config(basics[2:])
    with pytest.raises(ConfigError, match="--pretrained_teacher_model: no such folder: /nope/teacher"):
        load_config(["--pretrained_teacher_model", "/nope/teacher"] + basics[2:])
    with pytest.raises(ConfigError, match="--train_shards_path_or_url: .* matches no file"):
        load_config(basics[:2] + ["--train_shards_path_or_url", str(tmp_path / "x-{000..009}.tar")])
    # a Hub id passes the pre-load check (it is resolved when loading)
    assert load_config(["--pretrained_teacher_model", "org/model"] + basics[2:]).pretrained_teacher_model == "org/model"


def test_optional_packages_give_clear_errors(basics, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("bitsandbytes", "xformers") else real(n, *a))
    with pytest.raises(ConfigError, match="--use_8bit_adam needs bitsandbytes"):
        load_config(basics + ["--use_8bit_adam"])
    with pytest.raises(ConfigError, match="--enable_xformers_memory_efficient_attention needs xformers"):
        load_config(basics + ["--enable_xformers_memory_efficient_attention"])


def test_brace_expansion():
    assert _native.expand_shards("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert _native.expand_shards("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_parser_module_does_not_import_torch():
    code = ("import sys, argparse; from fastlcm.cli import train; p = argparse.ArgumentParser(); "
            "train.add_arguments(p); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    p = argparse.ArgumentParser()
    from fastlcm.cli import train

    train.add_arguments(p)
    assert "--w_min" in p.format_help() and "--config" in p.format_help()


def test_speed_lever_flags(basics):
    cfg = load_config(basics)
    assert (cfg.optimizer_impl, cfg.channels_last, cfg.compile_unets, cfg.compile_mode, cfg.loader_dtype,
            cfg.device_prefetch, cfg.precomputed_latents) == ("auto", False, "none", "default", "auto", True, False)
    assert (cfg.pixel_dtype(cuda=True), cfg.pixel_dtype(cuda=False)) == ("uint8", "float32")
    cfg = load_config(basics + ["--optimizer_impl", "foreach", "--channels_last", "--compile_unets", "student",
                                "--compile_mode", "reduce-overhead", "--loader_dtype", "bfloat16",
                                "--no-device_prefetch", "--precomputed_latents", "--loader_dtype", "float32"])
    assert (cfg.optimizer_impl, cfg.channels_last, cfg.compile_unets, cfg.compile_mode, cfg.device_prefetch,
            cfg.precomputed_latents, cfg.pixel_dtype(cuda=True)) == ("foreach", True, "student", "reduce-overhead",
                                                                      False, True, "float32")
    cfg = load_config(basics + ["--lora", "--compile_unets", "all"])  # one compiled UNet, adapters on and off
    assert (cfg.use_lora, cfg.compile_unets) == (True, "all")
    for flag, bad in (("--optimizer_impl", "apex"), ("--compile_unets", "teacher"), ("--loader_dtype", "fp8")):
        with pytest.raises(SystemExit):  # argparse choices
            load_config(basics + [flag, bad])
    with pytest.raises(ConfigError, match="--optimizer_impl fused cannot be used with --use_8bit_adam"):
        TrainConfig(**{**vars(load_config(basics)), "use_8bit_adam": True, "optimizer_impl": "fused"}).validate()
