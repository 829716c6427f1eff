"""The procedural captioned set: deterministic, captions match pixels, shards round-trip, classifier works."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastlcm.demo.procedural import (
    BACKGROUNDS,
    CAPTION_WORDS,
    COLOURS,
    FACTORS,
    POSITIONS,
    SHAPES,
    agreement,
    build_classifier,
    caption_for,
    parse_caption,
    procedural_batch,
    procedural_sample,
    render,
    split_logits,
    write_caption_tokenizer,
    write_procedural_shards,
)


def test_samples_are_pure_functions_of_seed_and_index():
    a_img, a_cap, a_lab = procedural_sample(5, seed=3)
    b_img, b_cap, b_lab = procedural_sample(5, seed=3)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_lab == b_lab
    assert a_img.shape == (64, 64, 3) and a_img.dtype == np.uint8
    others = [procedural_sample(i, seed=3)[1] for i in range(6, 30)] + [procedural_sample(5, seed=s)[1] for s in range(4, 12)]
    assert any(c != a_cap for c in others)
    imgs, caps, labs = procedural_batch(5, 3, seed=3)
    assert np.array_equal(imgs[0], a_img) and caps[0] == a_cap and labs[0] == a_lab


def test_every_factor_combination_round_trips_through_its_caption():
    for shape, colour, (pos, _, _), bg in itertools.product(SHAPES, COLOURS, POSITIONS, BACKGROUNDS):
        labels = {"shape": shape, "colour": colour, "position": pos, "background": bg}
        cap = caption_for(labels)
        assert parse_caption(cap) == labels
        assert cap.startswith(f"a {colour} {shape} ") and cap.endswith(f"on a {bg} background")
    assert caption_for({**labels, "position": "center"}).count("in the center") == 1


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle at the top on a black background", "", "hello world"])
def test_parse_caption_rejects_other_text_naming_it(bad):
    with pytest.raises(ValueError, match="procedural caption"):
        parse_caption(bad)


@pytest.mark.parametrize("name,row,col", POSITIONS)
def test_pixels_show_the_caption(name, row, col):
    labels = {"shape": "circle", "colour": "red", "position": name, "background": "gray"}
    img = render(labels)
    cy, cx = int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)
    assert tuple(img[cy, cx]) == COLOURS["red"]
    # The cell diagonally farthest from the shape is background.
    fy, fx = (60 if row < 1 else 3), (60 if col < 1 else 3)
    assert tuple(img[fy, fx]) == BACKGROUNDS["gray"]


def test_shapes_differ_in_area():
    area = {}
    for shape in SHAPES:
        img = render({"shape": shape, "colour": "white", "position": "center", "background": "black"})
        area[shape] = int((img.astype(int).sum(-1) > 3 * 128).sum())
    # Square (half side 0.88 r) > circle (π r²) > triangle (about 0.95 r²).
    assert area["square"] > area["circle"] > area["triangle"] > 20


def test_shards_round_trip(tmp_path):
    paths = write_procedural_shards(tmp_path, num_samples=10, samples_per_shard=4, seed=2)
    assert [p.name for p in paths] == ["procedural-00000.tar", "procedural-00001.tar", "procedural-00002.tar"]
    seen = 0
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.split(".")[0] for n in members})
        for key in keys:
            i = int(key)
            img, cap, lab = procedural_sample(i, seed=2)
            assert members[f"{key}.txt"].decode() == cap
            meta = json.loads(members[f"{key}.json"])
            assert {k: meta[k] for k in FACTORS} == lab and meta["original_width"] == 64
            decoded = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
            assert np.array_equal(decoded, img)  # png is lossless
            seen += 1
    assert seen == 10
    with pytest.raises(ValueError, match="num_samples"):
        write_procedural_shards(tmp_path, num_samples=0)


def test_caption_tokenizer_has_one_token_per_caption_word(tmp_path):
    tok = write_caption_tokenizer(tmp_path, max_length=16)
    for word in CAPTION_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
    assert tok.model_max_length == 16
    ids = tok(procedural_sample(0)[1]).input_ids
    assert len(ids) <= 16 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_classifier_heads_and_agreement():
    import torch

    model = build_classifier()
    logits = model(torch.zeros(2, 3, 64, 64))
    parts = split_logits(logits)
    assert {k: v.shape[1] for k, v in parts.items()} == {k: len(v) for k, v in FACTORS.items()}
    labels = [procedural_sample(i)[2] for i in range(4)]
    wrong_shape = [dict(lab, shape=next(s for s in SHAPES if s != lab["shape"])) for lab in labels]
    got = agreement(labels[:2] + wrong_shape[2:], labels)
    assert got["caption_accuracy"] == 0.5 and got["shape_accuracy"] == 0.5 and got["colour_accuracy"] == 1.0


def test_shipped_classifier_reads_clean_held_out_images():
    from fastlcm.demo.procedural import ASSETS, classify, load_classifier

    if not (ASSETS / "caption_classifier.safetensors").is_file():
        pytest.fail("fastlcm/assets/caption_classifier.safetensors is missing (python -m fastlcm.demo.teacher)")
    images, _, labels = procedural_batch(0, 200, seed=424242)  # seeds never used in training
    acc = agreement(classify(load_classifier(), images), labels)
    assert acc["shape_accuracy"] >= 0.95 and acc["colour_accuracy"] >= 0.98, acc
