"""SDXL teachers in the one `fastlcm train` path (tiny SDXL teacher, CPU): conditioning equals the stock SDXL
pipeline's (two encoders, pooled embeddings, add_time_ids height-first from the loader's sizes and crops), the
family defaults and dtypes, and full + LoRA runs end to end through the CLI whose outputs reload in
StableDiffusionXLPipeline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastlcm.cli import main
from fastlcm.config import TrainConfig
from fastlcm.cli.flags import load_config

SIZES = ((64, 96), (120, 80))  # (height, width): a wide and a tall source image


def _needs_loader():
    try:
        from fastlcm.data import ShardLoader  # noqa: F401
    except ImportError as e:
        pytest.skip(f"fastlcm.data.ShardLoader unavailable: {e}")


@pytest.fixture(scope="module")
def sdxl_teacher(tiny_teacher_factory):
    return tiny_teacher_factory("sdxl", "epsilon")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from fastlcm.testing import make_tiny_shards

    d = tmp_path_factory.mktemp("sdxl-shards")
    make_tiny_shards(d, num_samples=8, samples_per_shard=4)  # default sizes: widths 80, 64, 72, 100
    make_tiny_shards(d, num_samples=4, samples_per_shard=4, sizes=SIZES, prefix="hw")
    return d


@pytest.fixture(scope="module")
def teacher_parts(sdxl_teacher):
    from fastlcm.families import load_teacher

    return load_teacher(TrainConfig(pretrained_teacher_model=str(sdxl_teacher)).teacher_source())


def test_family_defaults(sdxl_teacher, tiny_sd_teacher, shard_dir):
    shards = ["--train_shards_path_or_url", str(shard_dir / "hw-00000.tar")]
    xl = load_config(["--pretrained_teacher_model", str(sdxl_teacher)] + shards)
    assert xl.w_min == 3.0  # the SDXL scripts' default
    assert load_config(["--pretrained_teacher_model", str(sdxl_teacher), "--w_min", "5"] + shards).w_min == 5.0
    assert load_config(["--pretrained_teacher_model", str(tiny_sd_teacher)] + shards).w_min == 5.0
    from fastlcm.families import detect

    assert detect(xl.teacher_source()).name == "sdxl"


def test_json_filter_flags_reach_the_loader(sdxl_teacher, shard_dir, monkeypatch):
    import fastlcm.data
    from fastlcm.training.setup import make_shard_loader

    seen = {}
    from .test_train import capturing

    monkeypatch.setattr(fastlcm.data, "ShardLoader", capturing(seen, ()), raising=False)
    cfg = load_config(["--pretrained_teacher_model", str(sdxl_teacher), "--train_shards_path_or_url",
                       str(shard_dir / "hw-00000.tar"), "--min_original_width", "960", "--min_original_height",
                       "900", "--max_pwatermark", "0.5"])
    make_shard_loader(cfg, 0, 1, None, 0)
    kw = seen["kw"]
    assert (kw["min_original_width"], kw["min_original_height"], kw["max_pwatermark"]) == (960, 900, 0.5)
    with pytest.raises(Exception, match="--max_pwatermark must be in"):
        load_config(["--pretrained_teacher_model", str(sdxl_teacher), "--train_shards_path_or_url",
                     str(shard_dir / "hw-00000.tar"), "--max_pwatermark", "2"])


def test_vae_stays_fp32_unless_a_replacement_vae_is_given():
    from fastlcm.families import Teacher, get_family

    def parts(family):
        mods = [torch.nn.Linear(2, 2) for _ in range(4)]
        return Teacher(get_family(family), mods[0], mods[1], tuple(mods[2:]), (None, None), None, {})

    xl = parts("sdxl")
    dt = xl.family.place(xl, "cpu", torch.bfloat16)
    assert dt["vae"] == torch.float32 and xl.vae.weight.dtype == torch.float32
    assert xl.text_encoders[1].weight.dtype == torch.bfloat16 and dt["unet"] == torch.bfloat16
    xl = parts("sdxl")  # a replacement VAE given (--pretrained_vae_model_name_or_path x/fp16-vae)
    assert xl.family.place(xl, "cpu", torch.bfloat16, vae_replaced=True)["vae"] == torch.bfloat16
    sd = parts("sd")
    assert sd.family.place(sd, "cpu", torch.bfloat16)["vae"] == torch.bfloat16  # SD VAE is bf16-safe


def test_conditioning_matches_the_stock_sdxl_pipeline(teacher_parts, shard_dir):
    """Embeddings and pooled embeddings = StableDiffusionXLPipeline.encode_prompt; c∅ = zeros (its
    force_zeros_for_empty_prompt); add_time_ids = (orig_h, orig_w, top, left, R, R) from the loader's batch,
    equal to the pipeline's _get_add_time_ids for original_size=(h, w), crops_coords_top_left=(top, left)."""
    _needs_loader()
    from diffusers import StableDiffusionXLPipeline

    from fastlcm.data import ShardLoader

    t = teacher_parts
    cond = t.conditioner("cpu", resolution=64)
    batch = next(iter(ShardLoader(str(shard_dir / "hw-00000.tar"), 4, 64, seed=5, shuffle_buffer=0, threads=1)))
    # the loader reports the decoded source sizes (h, w) for these keys
    want_sizes = [SIZES[int(k) % 2] for k in batch.keys]
    assert batch.original_sizes.tolist() == [list(s) for s in want_sizes]
    ids = cond.time_ids(batch, 4)
    assert ids.dtype == torch.float32 and ids.shape == (4, 6)
    for row, (h, w), (top, left) in zip(ids.tolist(), want_sizes, batch.crop_coords.tolist()):
        assert row == [h, w, top, left, 64, 64]
        # the short side is resized to 64, so only the long side has room to crop
        assert (top == 0 and 0 <= left <= 32) if w > h else (left == 0 and 0 <= top <= 32)
    assert any(c != [0, 0] for c in batch.crop_coords.tolist())  # seed 5 gives real crops

    pipe = StableDiffusionXLPipeline(vae=t.vae, text_encoder=t.text_encoders[0], text_encoder_2=t.text_encoders[1],
                                     tokenizer=t.tokenizers[0], tokenizer_2=t.tokenizers[1], unet=t.unet,
                                     scheduler=t.noise_scheduler, force_zeros_for_empty_prompt=True)
    for row, (h, w), (top, left) in zip(ids, want_sizes, batch.crop_coords.tolist()):
        stock = pipe._get_add_time_ids((h, w), (top, left), (64, 64), dtype=torch.float32,
                                       text_encoder_projection_dim=t.text_encoders[1].config.projection_dim)
        assert torch.equal(stock[0], row)

    c, u = cond.encode(batch.captions, batch), cond.unconditional(4, batch)
    pe, npe, pooled, npooled = pipe.encode_prompt(batch.captions, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True)
    torch.testing.assert_close(c.prompt_embeds, pe)
    torch.testing.assert_close(c.added["text_embeds"], pooled)
    assert torch.equal(u.prompt_embeds, torch.zeros_like(pe)) and torch.equal(npe, torch.zeros_like(pe))
    assert torch.equal(u.added["text_embeds"], torch.zeros_like(npooled))
    assert torch.equal(u.added["time_ids"], ids)  # c∅ keeps the sample's micro-conditioning

    fixed = t.conditioner("cpu", resolution=64, fix_crop_and_size=True)
    assert fixed.time_ids(batch, 4).tolist() == [[64, 64, 0, 0, 64, 64]] * 4
    with pytest.raises(ValueError, match="original_sizes and crop_coords"):
        cond.time_ids(SimpleNamespace(captions=["x"]), 1)


def _train(teacher, shard_dir, out, *extra):
    argv = ["train", "--pretrained_teacher_model", str(teacher),
            "--train_shards_path_or_url", str(shard_dir / "shard-{00000..00001}.tar"), "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
            "--dataloader_num_workers", "1", "--shuffle_buffer", "4", "--max_train_steps", "2",
            "--checkpointing_steps", "2", "--validation_steps", "2", "--validation_prompts", "a cat",
            "--validation_num_inference_steps", "2", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _xl_pipe(teacher, **kw):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(teacher, **kw)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, guidance):
    return pipe("a red circle", num_inference_steps=2, guidance_scale=guidance, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _generate(teacher, out_png, *flags):
    """`fastlcm generate` on a real export: exit 0 and a 64×64 RGB image."""
    from PIL import Image

    from fastlcm.cli import main

    assert main(["generate", "--teacher", str(teacher), *flags, "--prompt", "a red circle", "--steps", "2",
                 "--height", "64", "--width", "64", "--out", str(out_png)]) == 0
    with Image.open(out_png) as im:
        assert im.size == (64, 64)


def test_cli_full_sdxl_distillation_exports_a_unet_that_generates(sdxl_teacher, shard_dir, tmp_path, monkeypatch):
    _needs_loader()
    monkeypatch.setenv("FASTLCM_KERNELS", "torch")
    out = tmp_path / "full"
    rows = _train(sdxl_teacher, shard_dir, out, "--min_original_width", "72")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert rows[-1]["loader"]["skipped"]["filtered"] >= 1  # width-64 samples dropped by the json filter
    assert {p.name for p in (out / "validation").glob("*.png")} == {"step-000002-online.png",
                                                                     "step-000002-target.png"}
    assert (out / "checkpoint-2" / "unet_target" / "config.json").is_file()

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.time_cond_proj_dim == 256 and unet.config.addition_embed_type == "text_time"
    img = _render(_xl_pipe(sdxl_teacher, unet=unet), 8.0)
    assert img.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(img)).all())
    assert float(img.std()) > 0
    _generate(sdxl_teacher, tmp_path / "full.png", "--unet", str(out / "unet"))


def test_cli_sdxl_lora_exports_weights_that_load_in_stock_pipeline(sdxl_teacher, shard_dir, tmp_path, monkeypatch):
    _needs_loader()
    monkeypatch.setenv("FASTLCM_KERNELS", "torch")
    out = tmp_path / "lora"
    rows = _train(sdxl_teacher, shard_dir, out, "--lora_rank", "4", "--learning_rate", "1e-3",
                  "--use_fix_crop_and_size")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    assert (out / "checkpoint-2" / "unet_lora" / "peft_adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in (out / "validation").glob("*.png")] == ["step-000002-online.png"]

    pipe = _xl_pipe(sdxl_teacher)
    before = _render(pipe, 1.0)
    pipe.load_lora_weights(out)
    after = _render(pipe, 1.0)
    assert after.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(after)).all())
    assert float(abs(after - before).max()) > 1e-4
    lora_keys = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert any("attn1.to_q" in n for n in lora_keys) and any("time_emb_proj" in n for n in lora_keys)
    _generate(sdxl_teacher, tmp_path / "lora.png", "--lora", str(out))


def test_sdxl_and_lora_presets_parse(sdxl_teacher, shard_dir):
    from fastlcm.cli.flags import preset_names, read_toml

    assert {"sdxl", "sdxl-lora", "sd15-lora"} <= set(preset_names())
    full, lora, sd_lora = (TrainConfig(**read_toml(n)) for n in ("sdxl", "sdxl-lora", "sd15-lora"))
    assert full.resolution == lora.resolution == 1024 and sd_lora.resolution == 512
    assert not full.use_lora and lora.use_lora and sd_lora.use_lora and lora.lora_r == 64
    assert full.w_min == lora.w_min == 3.0 and full.min_original_width == 960 and full.max_pwatermark == 0.5
    assert lora.learning_rate == sd_lora.learning_rate == 1e-4 and full.learning_rate == 1e-6
    cfg = load_config(["--config", "sdxl-lora", "--pretrained_teacher_model", str(sdxl_teacher),
                       "--pretrained_vae_model_name_or_path", str(Path(sdxl_teacher) / "vae"),
                       "--train_shards_path_or_url", str(shard_dir / "hw-00000.tar"), "--lora_rank", "8"])
    assert cfg.use_lora and cfg.lora_r == 8 and cfg.use_fix_crop_and_size and cfg.validation_guidance_scale == 1.0
