"""`fastlcm make-shards` round trips, read back with the reference reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastlcm import testing
from fastlcm.cli import main
from fastlcm.data import reference as ref


def test_synthetic_round_trip(tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(
        ["make-shards", "--synthetic", "5", "--out", str(out), "--samples-per-shard", "2", "--min-size", "40",
         "--max-size", "60", "--seed", "3", "--prefix", "syn"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    spec = str(out / "syn-{00000..00002}.tar")
    assert spec in printed and "5 samples" in printed
    assert sorted(p.name for p in out.iterdir()) == ["syn-00000.tar", "syn-00001.tar", "syn-00002.tar"]
    samples, skipped = ref.read_samples(spec)
    assert not skipped
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(5)]
    for s in samples:
        h, w = ref.decode_rgb(s.image).shape[:2]
        assert s.image_ext == "jpg" and 40 <= h <= 60 and 40 <= w <= 60
        assert (s.json["original_height"], s.json["original_width"]) == (h, w)
        assert 0 <= s.json["pwatermark"] <= 1
        assert s.caption.startswith("a ")
    # same seed → byte-identical shards; another seed → different images
    again = tmp_path / "again"
    main(["make-shards", "--synthetic", "5", "--out", str(again), "--samples-per-shard", "2", "--min-size", "40",
          "--max-size", "60", "--seed", "3", "--prefix", "syn"])
    assert (again / "syn-00001.tar").read_bytes() == (out / "syn-00001.tar").read_bytes()


def test_synthetic_formats(tmp_path):
    for fmt in ("png", "webp"):
        assert main(["make-shards", "--synthetic", "2", "--out", str(tmp_path / fmt), "--format", fmt,
                     "--min-size", "16", "--max-size", "20"]) == 0
        samples, _ = ref.read_samples(str(tmp_path / fmt / "shard-00000.tar"))
        assert [s.image_ext for s in samples] == [fmt, fmt]


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    files = {}
    for name, fmt in [("b.jpg", "jpg"), ("a.PNG", "png"), ("sub/c.webp", "webp"), ("sub/d.e.jpeg", "jpg")]:
        data = testing.encode_image(testing.synthetic_image(rng, 24, 32)[0], fmt)
        (root / name).write_bytes(data)
        files[name] = data
        (root / name).with_suffix(".txt").write_bytes(f"caption of {name}".encode())
    (root / "b.json").write_text(json.dumps({"original_width": 32}))
    (root / "notes.md").write_text("ignored")
    return root, files


def test_folder_round_trip_copies_bytes(tmp_path, capsys):
    root, files = _folder(tmp_path)
    out = tmp_path / "out"
    assert main(["make-shards", "--images", str(root), "--out", str(out), "--samples-per-shard", "3"]) == 0
    samples, skipped = ref.read_samples(str(out / "shard-{00000..00001}.tar"))
    assert not skipped
    # sorted by path; keys lose dots and slashes so the loader's first-dot split keeps them whole
    assert [s.key for s in samples] == ["a", "b", "sub_c", "sub_d_e"]
    assert [s.image_ext for s in samples] == ["png", "jpg", "webp", "jpeg"]
    for s, name in zip(samples, ["a.PNG", "b.jpg", "sub/c.webp", "sub/d.e.jpeg"]):
        assert s.image == files[name] and s.caption == f"caption of {name}"
    assert samples[1].json == {"original_width": 32} and samples[0].json is None


def test_folder_reencode(tmp_path):
    root, _ = _folder(tmp_path)
    out = tmp_path / "out"
    assert main(["make-shards", "--images", str(root), "--out", str(out), "--format", "png"]) == 0
    samples, _ = ref.read_samples(str(out / "shard-00000.tar"))
    assert [s.image_ext for s in samples] == ["png"] * 4
    assert all(ref.decode_rgb(s.image).shape == (24, 32, 3) for s in samples)


def test_missing_caption_policies(tmp_path, capsys):
    root, _ = _folder(tmp_path)
    (root / "sub" / "c.txt").unlink()
    out = tmp_path / "out"
    assert main(["make-shards", "--images", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(root / "sub" / "c.webp") in err and "c.txt" in err
    assert not out.exists(), "nothing is written when the input is bad"
    assert main(["make-shards", "--images", str(root), "--out", str(out), "--missing-caption", "skip"]) == 0
    assert [s.key for s in ref.read_samples(str(out / "shard-00000.tar"))[0]] == ["a", "b", "sub_d_e"]
    assert main(["make-shards", "--images", str(root), "--out", str(out), "--missing-caption", "empty",
                 "--overwrite"]) == 0
    samples = ref.read_samples(str(out / "shard-00000.tar"))[0]
    assert [s.caption for s in samples if s.key == "sub_c"] == [""]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--images", "{tmp}/nope"], "{tmp}/nope"),
        (["--synthetic", "0"], "--synthetic"),
        (["--synthetic", "2", "--min-size", "50", "--max-size", "10"], "--min-size"),
        (["--synthetic", "2", "--samples-per-shard", "0"], "--samples-per-shard"),
        (["--synthetic", "2", "--quality", "101"], "--quality"),
        (["--synthetic", "2", "--prefix", "a/b"], "--prefix"),
    ],
)
def test_clear_errors(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["make-shards", *argv, "--out", str(tmp_path / "o")]) == 2
    assert needle.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_refuses_to_overwrite_and_bad_json(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["make-shards", "--synthetic", "1", "--min-size", "8", "--max-size", "8", "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2
    assert str(out / "shard-00000.tar") in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    root, _ = _folder(tmp_path)
    (root / "b.json").write_text("{broken")
    assert main(["make-shards", "--images", str(root), "--out", str(tmp_path / "o2")]) == 2
    assert str(root / "b.json") in capsys.readouterr().err
