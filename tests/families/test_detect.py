"""Model families: a teacher's family is read once from its model_index.json pipeline class; teachers of other
families (SD3, Flux, anything unknown) are refused with a one-line error naming the class."""

from __future__ import annotations

import json

import pytest

from fastlcm.errors import ConfigError, FastlcmError, UnsupportedFamilyError
from fastlcm.families import FAMILIES, ModelSource, detect, family_for_index, get_family, read_model_index

SD3_INDEX = {  # the layout of stabilityai/stable-diffusion-3-medium-diffusers: three text encoders, a transformer
    "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip
FLUX_INDEX = {  # black-forest-labs/FLUX.1-dev: CLIP + T5, a transformer, text_encoder_2 like SDXL
    "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip


def _folder(tmp_path, index, name="teacher"):
    root = tmp_path / name
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_sd_and_sdxl_teachers_are_detected_by_their_pipeline_class(tiny_teacher_factory):
    for family in ("sd", "sdxl"):
        path = tiny_teacher_factory(family, "epsilon")
        assert detect(path) is FAMILIES[family] and detect(ModelSource(str(path))).name == family
        assert get_family(family) is FAMILIES[family]
    assert family_for_index({"_class_name": "StableDiffusionPipeline"}).name == "sd"
    assert family_for_index({"_class_name": "StableDiffusionXLPipeline"}).name == "sdxl"


@pytest.mark.parametrize("index,cls", [(SD3_INDEX, "StableDiffusion3Pipeline"), (FLUX_INDEX, "FluxPipeline"),
                                       ({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2D"]},
                                        "KandinskyPipeline")])
def test_other_families_are_refused_not_taken_for_sdxl(tmp_path, index, cls):
    """Both SD3 and Flux have a text_encoder_2 (the old rule's SDXL marker); they are refused by their class."""
    root = _folder(tmp_path, index)
    with pytest.raises(UnsupportedFamilyError) as e:
        detect(root)
    message = str(e.value)
    assert f"unsupported model family {cls}" in message and str(root) in message and "\n" not in message
    assert "StableDiffusionPipeline (sd)" in message and "StableDiffusionXLPipeline (sdxl)" in message
    assert isinstance(e.value, ConfigError) and isinstance(e.value, FastlcmError)


def test_unreadable_or_missing_model_index_is_one_line(tmp_path):
    for index, needle in (({"unet": ["diffusers", "UNet2DConditionModel"]}, "has no _class_name"),
                          ([1, 2], "is not a JSON object")):
        root = _folder(tmp_path, index, name=f"t{len(needle)}")
        with pytest.raises(ConfigError, match=needle):
            detect(root)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable model_index.json"):
        read_model_index(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model_index.json"):
        detect(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such folder"):
        detect(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown model family 'flux'"):
        get_family("flux")


def test_fastlcm_train_refuses_an_sd3_teacher_in_one_line_before_loading(tmp_path, capsys, monkeypatch):
    from fastlcm.cli import main
    from fastlcm.families import UNetFamily
    from fastlcm.testing import make_tiny_shards

    def boom(*a, **k):
        raise AssertionError("a model was loaded for an unsupported teacher")

    monkeypatch.setattr(UNetFamily, "load", boom)
    make_tiny_shards(tmp_path / "shards", num_samples=2, samples_per_shard=2)
    teacher = _folder(tmp_path, SD3_INDEX)
    (teacher / "text_encoder_2").mkdir()  # what made the old detection call it SDXL
    rc = main(["train", "--pretrained_teacher_model", str(teacher), "--train_shards_path_or_url",
               str(tmp_path / "shards" / "shard-00000.tar"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("fastlcm train: error: --pretrained_teacher_model: ")
    assert "unsupported model family StableDiffusion3Pipeline" in err
    assert not (tmp_path / "out").exists()


def test_every_family_answers_what_the_trainer_asks():
    """The per-family knowledge the rest of the package reads instead of testing family names."""
    sd, xl = get_family("sd"), get_family("sdxl")
    assert (sd.default_w_min, xl.default_w_min) == (5.0, 3.0)  # diffusers' sd / sdxl LCM scripts
    assert sd.latent_channels == xl.latent_channels == 4
    assert sd.cached_fields == ("prompt_embeds",) and xl.cached_fields == ("prompt_embeds", "pooled_embeds")
    assert sd.pipeline_class().__name__ == "StableDiffusionPipeline"
    assert xl.pipeline_class().__name__ == "StableDiffusionXLPipeline"
    assert "to_q" in sd.lora_target_modules and "time_emb_proj" in xl.lora_target_modules
