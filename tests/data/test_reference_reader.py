"""The pure-Python reference reader (the loader's test oracle) against hand-built tars."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from PIL import Image

from fastlcm import testing
from fastlcm.data import reference as ref


def _jpg(seed=0, h=40, w=56):
    return testing.encode_image(testing.synthetic_image(np.random.default_rng(seed), h, w)[0], "jpg")


def test_expand_shards_braces_ranges_and_lists():
    assert ref.expand_shards("/d/{00000..00002}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
    assert ref.expand_shards("{a,b}/x{1..2}.tar") == ["a/x1.tar", "a/x2.tar", "b/x1.tar", "b/x2.tar"]
    assert ref.expand_shards("x.tar::y.tar") == ["x.tar", "y.tar"]
    assert ref.expand_shards(["a.tar", "b{8..10}.tar"]) == ["a.tar", "b8.tar", "b9.tar", "b10.tar"]
    assert ref.expand_shards("{09..11}") == ["09", "10", "11"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.jpg", ("a", "jpg")),
        ("a.b.JPG", ("a", "b.jpg")),
        ("dir/x.y/a.TXT", ("dir/x.y/a", "txt")),
        ("noext", None),
        ("__index__", None),
        ("__key__", None),
        ("__meta__.json", ("__meta__", "json")),  # webdataset skips only names matching __…__ (+ "/…")
        ("__dir__/a.jpg", None),
        (".hidden", None),
    ],
)
def test_split_key(name, expected):
    assert ref.split_key(name) == expected


def test_grouping_key_change_repeated_ext_and_ignored_members():
    members = [
        ("a.jpg", b"1"),
        ("a.txt", b"2"),
        ("__index__", b"ignored"),
        ("a.JSON", b"3"),
        ("a.jpg", b"4"),  # repeated ext: new sample with the same key
        ("b.txt", b"5"),
        ("readme", b"ignored"),
        ("b.png", b"6"),
        ("c.b.jpg", b"7"),
    ]
    groups = list(ref.group_members(members))
    assert groups == [
        ("a", {"jpg": b"1", "txt": b"2", "json": b"3"}),
        ("a", {"jpg": b"4"}),
        ("b", {"txt": b"5", "png": b"6"}),
        ("c", {"b.jpg": b"7"}),
    ]


def test_read_shard_selection_skips_and_captions(tmp_path):
    png = testing.encode_image(np.zeros((8, 8, 3), np.uint8), "png")
    shard = testing.write_tar(
        tmp_path / "s.tar",
        [
            ("k1.png", png),
            ("k1.jpg", _jpg()),  # jpg wins over png
            ("k1.caption", b"third choice"),
            ("k1.txt", b"second choice"),
            ("k1.json", json.dumps({"original_width": 7}).encode()),
            ("k2.txt", b"no image"),
            ("k3.webp", testing.encode_image(np.zeros((8, 8, 3), np.uint8), "webp")),  # no caption
            ("k4.jpg", b"not a jpeg at all"),
            ("k4.txt", b"corrupt"),
            ("k5.jpg", b""),
            ("k5.txt", b"zero bytes"),
            ("k6.jpeg", _jpg(1)),
            ("k6.text", b"caf\xe9 \xff ok"),
            ("k6.json", b"{not json"),
        ],
    )
    got = ref.read_shard(str(shard))
    assert [s.key for s in got.samples] == ["k1", "k6"]
    k1, k6 = got.samples
    assert (k1.image_ext, k1.caption, k1.json) == ("jpg", "second choice", {"original_width": 7})
    assert (k6.image_ext, k6.caption, k6.json) == ("jpeg", "caf\ufffd \ufffd ok", None)
    assert got.skipped == {"missing_image": 1, "missing_caption": 1, "corrupt_image": 2}
    assert not got.truncated


def test_truncated_tar_keeps_complete_samples(tmp_path):
    members = []
    for i in range(4):
        members += [(f"{i:03d}.jpg", _jpg(i)), (f"{i:03d}.txt", f"caption {i}".encode())]
    full = testing.write_tar(tmp_path / "full.tar", members)
    offsets = testing.tar_member_offsets(full)
    start, size = offsets["002.jpg"]
    cut = testing.truncated_copy(full, tmp_path / "cut.tar", start + size // 2)
    got = ref.read_shard(str(cut))
    assert got.truncated
    assert [s.key for s in got.samples] == ["000", "001"]
    assert got.skipped == {"truncated_tar": 1}
    # cut inside the header that would close sample 2: sample 2 is still in progress, so it is dropped too
    header = offsets["003.jpg"][0] - 512
    got = ref.read_shard(str(testing.truncated_copy(full, tmp_path / "cut2.tar", header + 100)))
    assert got.truncated and [s.key for s in got.samples] == ["000", "001"]
    # a tar that simply stops at a header boundary (no end blocks) is complete, not truncated
    got = ref.read_shard(str(testing.truncated_copy(full, tmp_path / "noend.tar", header)))
    assert not got.truncated and [s.key for s in got.samples] == ["000", "001", "002"]


def test_missing_shard_is_a_source_error(tmp_path):
    samples, skipped = ref.read_samples([str(tmp_path / "nope.tar")])
    assert samples == [] and skipped == {"source_error": 1}


@pytest.mark.parametrize("variant", testing.PNG_VARIANTS)
def test_decode_rgb_png_variants(variant):
    data = testing.png_variant(np.random.default_rng(3), 12, 10, variant)
    rgb = ref.decode_rgb(data)
    assert rgb.shape == (12, 10, 3) and rgb.dtype == np.uint8
    if variant.startswith("gray"):
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    base = testing.synthetic_image(np.random.default_rng(3), 12, 10)[0]
    if variant in ("rgb16", "rgba16"):
        # built so that the high byte of every 16-bit sample is the 8-bit synthetic image; PIL keeps the high byte
        np.testing.assert_array_equal(rgb, base)
    if variant == "gray16":
        # PIL's convert("RGB") of mode I;16 clips the 16-bit value at 255 (kept: parity with webdataset + PIL)
        wide = base[..., 0].astype(np.int64) * 256
        assert (rgb[..., 0][wide >= 255] == 255).all()
    if variant in ("rgb8", "rgba8"):
        np.testing.assert_array_equal(rgb, base)


def test_decode_rejects_huge_declared_dimensions():
    for data in (testing.png_with_declared_size(60000, 60000), testing.jpeg_with_declared_size(60000, 60000)):
        with pytest.raises(Exception):
            ref.decode_rgb(data)


def test_resize_crop_flip_normalize():
    assert ref.resized_size(600, 800, 512) == (512, 682)  # int(512*800/600) = int(682.67)
    assert ref.resized_size(1000, 700, 512) == (731, 512)  # int(512*1000/700) = int(731.43)
    assert ref.resized_size(64, 64, 64) == (64, 64)
    assert ref.center_crop_coords(512, 682, 512) == (0, 85)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(60, 90, 3)).astype(np.uint8)
    resized = ref.resize_short_side(rgb, 32)
    want = np.asarray(Image.fromarray(rgb).resize((48, 32), Image.BILINEAR))
    np.testing.assert_array_equal(resized, want)
    chw = ref.crop_uint8(resized, 32, 0, 5, flip=True)
    np.testing.assert_array_equal(chw, resized[:, 5:37][:, ::-1].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="outside"):
        ref.crop_uint8(resized, 32, 1, 0, flip=False)
    # golden values: 0 → -1, 255 → +1, 51 → 51/255*2-1 = -0.6
    np.testing.assert_allclose(ref.normalize(np.array([0, 255, 51], np.uint8)), [-1.0, 1.0, -0.6], atol=1e-6)


def test_reference_pixels_of_a_flat_image_are_flat():
    data = testing.encode_image(np.full((30, 50, 3), (0, 51, 255), np.uint8), "png")
    px = ref.reference_pixels(data, 16, 0, 3, flip=False)
    assert px.shape == (3, 16, 16) and px.dtype == np.float32
    np.testing.assert_allclose(px[:, 0, 0], [-1.0, -0.6, 1.0], atol=1e-6)
    assert np.ptp(px.reshape(3, -1), axis=1).max() < 1e-6


def test_passes_filters():
    meta = {"original_width": 800, "original_height": 600, "pwatermark": 0.3}
    assert ref.passes_filters(meta, 800, 600, 0.3)
    assert not ref.passes_filters(meta, min_original_width=801)
    assert not ref.passes_filters(meta, max_pwatermark=0.2)
    assert not ref.passes_filters(None, min_original_height=1)
    assert ref.passes_filters(None)


# webdataset's file opener leaves each shard's file object to the garbage collector (its ResourceWarning is collected
# here, inside this test, instead of failing whichever test the collector happens to run in)
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_webdataset_pipeline_matches_the_oracle(tmp_path):
    paths = testing.make_tiny_shards(tmp_path, num_samples=8, samples_per_shard=4, image_format="mixed")
    spec = str(tmp_path / "shard-{00000..00001}.tar")
    samples, _ = ref.read_samples(spec)
    by_caption = {}
    for s in samples:
        by_caption.setdefault(s.caption, []).append(s)
    pipe = ref.webdataset_pipeline(spec, 4, 32, shuffle_buffer=0, crop="center", resampled=False)
    batches = list(pipe)
    assert len(batches) == 2 and len(paths) == 2
    seen = 0
    for pixels, captions in batches:
        assert tuple(pixels.shape) == (4, 3, 32, 32)
        for px, cap in zip(pixels.numpy(), captions):
            sample = samples[seen]
            assert cap == sample.caption
            h, w = ref.resized_size(*ref.decode_rgb(sample.image).shape[:2], 32)
            want = ref.reference_pixels(sample.image, 32, *ref.center_crop_coords(h, w, 32))
            np.testing.assert_array_equal(px, want)
            seen += 1
    assert seen == len(samples) == 8
    del pipe, batches
    gc.collect()
