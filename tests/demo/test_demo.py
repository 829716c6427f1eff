"""`fastlcm demo` end to end on a tiny budget: shards → Rust loader → trainer → export → evaluation report."""

from __future__ import annotations

import json

from PIL import Image

from fastlcm.cli import main


def test_demo_distills_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "2", "--batch-size", "8", "--num-samples", "64",
               "--num-prompts", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "student_4" in printed and "teacher_ddim_50" in printed

    report = json.loads((out / "report.json").read_text())
    for k in (1, 2, 4, 8):
        for name in (f"teacher_ddim_{k}", f"student_{k}", f"undistilled_student_{k}"):
            assert set(report[name]) >= {"latent_mse", "psnr", "caption_accuracy"}, name
            assert report[name]["latent_mse"] >= 0
    assert report["teacher_ddim_50"]["latent_mse"] == 0.0
    assert report["meta"]["train_steps"] == 2
    # the distilled student was really trained: its weights differ from the undistilled stand-in's numbers
    assert report["student_4"]["latent_mse"] != report["undistilled_student_4"]["latent_mse"]

    with Image.open(out / "grid.png") as grid:
        assert grid.height > 5 * 64 and grid.width > 2 * 64  # 5 rows of 64 px images, 2 prompts
    assert (out / "train" / "unet_target" / "config.json").exists()
    assert (out / "train" / "unet" / "config.json").exists()
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


def test_demo_rejects_bad_flags(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--num-samples", "4", "--batch-size", "8"]) == 2
    assert "--num-samples" in capsys.readouterr().err
