"""The offline builders in fastlcm.testing: tiny teachers load in stock diffusers pipelines; shards are valid."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastlcm.testing import build_clip_vocab, load_tiny_pipeline, make_tiny_shards, write_tar

EXPECTED_DIRS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}


@pytest.mark.parametrize(
    "family,prediction_type,pipeline_class",
    [
        ("sd", "epsilon", "StableDiffusionPipeline"),
        ("sd", "v_prediction", "StableDiffusionPipeline"),
        ("sdxl", "epsilon", "StableDiffusionXLPipeline"),
        ("sdxl", "v_prediction", "StableDiffusionXLPipeline"),
    ],
)
def test_tiny_teacher_loads_in_stock_pipeline_and_samples(tiny_teacher_factory, family, prediction_type, pipeline_class):
    import diffusers

    path = tiny_teacher_factory(family, prediction_type)
    dirs = {p.name for p in path.iterdir() if p.is_dir()}
    expected = EXPECTED_DIRS | ({"text_encoder_2", "tokenizer_2"} if family == "sdxl" else set())
    assert dirs == expected
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class

    # The stock class itself (not our helper) must load it offline.
    pipe = getattr(diffusers, pipeline_class).from_pretrained(path, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.vae_scale_factor == 8
    out = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    images = out.images
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0  # a random teacher still produces a non-constant image


def test_tiny_teachers_are_deterministic_and_differ_by_seed(tmp_path):
    from fastlcm.testing import make_tiny_teacher

    a = load_tiny_pipeline(make_tiny_teacher(tmp_path / "a", seed=1)).unet.state_dict()
    b = load_tiny_pipeline(make_tiny_teacher(tmp_path / "b", seed=1)).unet.state_dict()
    c = load_tiny_pipeline(make_tiny_teacher(tmp_path / "c", seed=2)).unet.state_dict()
    name = "conv_in.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


def test_make_tiny_teacher_rejects_unknown_options(tmp_path):
    from fastlcm.testing import make_tiny_teacher

    with pytest.raises(ValueError, match="family"):
        make_tiny_teacher(tmp_path, family="sd3")
    with pytest.raises(ValueError, match="prediction_type"):
        make_tiny_teacher(tmp_path, prediction_type="flow")


def test_clip_vocab_is_a_valid_bpe(tiny_sd_teacher):
    vocab, merges = build_clip_vocab()
    assert len(set(vocab.values())) == len(vocab) == max(vocab.values()) + 1
    for a, b in merges:
        assert a + b in vocab, (a, b)
    tok = load_tiny_pipeline(tiny_sd_teacher).tokenizer
    ids = tok("a red circle on a blue background").input_ids
    # learned merges make whole words single tokens: bos + 7 words + eos
    assert len(ids) == 9
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle on a blue background"
    padded = tok("x", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "mixed"])
def test_make_tiny_shards_writes_grouped_samples(tmp_path, fmt):
    paths = make_tiny_shards(tmp_path, num_samples=5, samples_per_shard=2, image_format=fmt)
    assert [p.name for p in paths] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    seen = []
    for path in paths:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            for name in names:
                key, ext = name.split(".", 1)
                data = tar.extractfile(name).read()
                if ext in ("jpg", "png", "webp"):
                    img = Image.open(io.BytesIO(data))
                    assert img.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    assert (meta["original_height"], meta["original_width"]) == (img.height, img.width)
                    seen.append(key)
                elif ext == "txt":
                    assert data.decode().startswith("a ")
    assert seen == [f"{i:08d}" for i in range(5)]


def test_write_tar_keeps_member_order_and_bytes(tmp_path):
    members = [("b.txt", b"x"), ("a.b.jpg", b"\x00\x01"), ("__meta__", b"")]
    path = write_tar(tmp_path / "h.tar", members)
    with tarfile.open(path) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
