"""`fastlcm bench step`'s inputs: a random-weight teacher of the published SD1.5 / SDXL architecture (no download),
synthetic shards for the Rust loader, and fixed pinned batches (images, or cached latents) that isolate the GPU."""

from __future__ import annotations

import dataclasses
from argparse import Namespace
from pathlib import Path

# Published architectures (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 configs).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0,
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu",
)  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")  # fmt: skip


ARCHITECTURES = {
    # bench --family: (model family, UNet config, VAE sample size and scaling factor, text encoder configs)
    "sd15": ("sd", SD15_UNET, 512, 0.18215, (("CLIPTextModel", CLIP_L),)),
    "sdxl": ("sdxl", SDXL_UNET, 1024, 0.13025, (("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", CLIP_BIGG))),
}


def build_random_teacher(architecture: str, workdir: Path):
    """A :class:`fastlcm.families.Teacher` of the SD1.5 or SDXL architecture (:data:`ARCHITECTURES`) with random
    weights, in memory, frozen and in eval mode as a family's ``load`` leaves it. Tokenizers are the small local
    test tokenizer; each text encoder's vocab_size is set to its length (the real 49408-token embedding would only
    add an unused lookup table).

    Built on the current default device: call it under ``with torch.device("cuda"):`` to initialize the weights
    on the GPU directly (seconds instead of a minute of CPU init for SDXL)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from fastlcm.families import Teacher, frozen, get_family
    from fastlcm.testing import BOS_TOKEN, EOS_TOKEN, ddim_scheduler, write_clip_tokenizer

    family, unet_config, vae_size, scaling, text_parts = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    toks, encoders = [], []
    for i, (enc_class, arch) in enumerate(text_parts):
        tok = write_clip_tokenizer(workdir / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"),
                                   **({} if i == 0 else {"pad_token": "!"}))
        config = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77,
                                bos_token_id=tok.convert_tokens_to_ids(BOS_TOKEN),
                                eos_token_id=tok.convert_tokens_to_ids(EOS_TOKEN), pad_token_id=tok.pad_token_id,
                                **arch)  # fmt: skip
        toks.append(tok)
        encoders.append(frozen(getattr(transformers, enc_class)(config)))
    sched = DDPMScheduler.from_config(ddim_scheduler("epsilon").config)
    vae = frozen(AutoencoderKL(**SD_VAE, sample_size=vae_size, scaling_factor=scaling))
    unet = frozen(UNet2DConditionModel(**unet_config))
    return Teacher(get_family(family), unet, vae, tuple(encoders), tuple(toks), sched, dict(sched.config))


def make_shards(resolution: int, batch_size: int):
    """(spec, tmpdir) for ``--input loader``: synthetic JPEGs of resolution..2*resolution px (8 batches' worth, at
    least 32 images; the loader repeats them), via `fastlcm make-shards --synthetic`."""
    from fastlcm.bench.loader import make_synthetic

    count = max(8 * batch_size, 32)
    return make_synthetic(Namespace(synthetic=count, min_size=resolution, max_size=2 * resolution))


@dataclasses.dataclass
class FixedBatch:
    """--input synthetic: the fields of fastlcm.data.Batch the step reads, fixed (pixels pinned on CUDA)."""

    pixels: object
    captions: list
    original_sizes: object
    crop_coords: object
    keys: list = dataclasses.field(default_factory=list)


CAPTION = "a photo of a red circle number {} on a textured background"


def fixed_batch(batch_size: int, resolution: int, pin: bool, dtype: str = "float32") -> FixedBatch:
    """Random pixels in [-1, 1] as the loader would hand them over in ``dtype`` (uint8: 0..255)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, resolution, resolution, generator=gen) * 2 - 1
    if dtype == "uint8":
        pixels = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    elif dtype == "bfloat16":
        pixels = pixels.to(torch.bfloat16)
    sizes = torch.tensor([[resolution, resolution]] * batch_size, dtype=torch.int64)
    caps = [CAPTION.format(i) for i in range(batch_size)]
    return FixedBatch(pixels.pin_memory() if pin else pixels, caps, sizes, torch.zeros_like(sizes),
                      [f"{i:08d}" for i in range(batch_size)])  # fmt: skip


@dataclasses.dataclass
class FixedLatentBatch:
    """--input latents: the fields of fastlcm.data.latents.LatentBatch the step reads (float32, pinned on CUDA)."""

    latent_mean: object
    latent_std: object
    prompt_embeds: object
    pooled_embeds: object
    captions: list
    original_sizes: object
    crop_coords: object
    keys: list = dataclasses.field(default_factory=list)


def fixed_latent_batch(teacher, batch_size: int, resolution: int, pin: bool) -> FixedLatentBatch:
    """Random cached latents of the teacher's shapes: posterior mean/std [B, C, R/8, R/8] and the family's cached
    text fields: prompt embeddings [B, 77, cross_attention_dim] and, for SDXL, pooled embeddings [B,
    projection_dim]."""
    import torch

    gen = torch.Generator().manual_seed(0)
    r = resolution // 8
    ch = teacher.family.latent_channels
    mean = torch.randn(batch_size, ch, r, r, generator=gen) * 5
    std = torch.rand(batch_size, ch, r, r, generator=gen) * 0.1 + 0.01
    dims = {"prompt_embeds": (teacher.tokenizer.model_max_length, teacher.unet.config.cross_attention_dim),
            "pooled_embeds": (teacher.text_encoders[-1].config.projection_dim,)}
    fields = {name: torch.randn(batch_size, *dims[name], generator=gen) for name in teacher.family.cached_fields}
    sizes = torch.tensor([[resolution, resolution]] * batch_size, dtype=torch.int64)
    pin_ = (lambda t: t.pin_memory()) if pin else (lambda t: t)
    return FixedLatentBatch(pin_(mean), pin_(std), pin_(fields["prompt_embeds"]),
                            pin_(fields["pooled_embeds"]) if "pooled_embeds" in fields else None,
                            [CAPTION.format(i) for i in range(batch_size)], sizes, torch.zeros_like(sizes),
                            [f"{i:08d}" for i in range(batch_size)])  # fmt: skip
