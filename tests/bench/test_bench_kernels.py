"""`fastlcm bench kernels`: its CPU smoke path, the wrapper-overhead mode, L2 rotation (the real run needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from fastlcm.kernels import KERNELS_ENV, dispatch

pytest.importorskip("triton")



def bench_args(*argv):
    import argparse

    from fastlcm.bench import kernels as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench, parser.parse_args(list(argv))


def test_bench_arguments_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import argparse, sys; from fastlcm.bench import kernels; kernels.add_arguments(argparse.ArgumentParser()); "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_bench_without_cuda_says_so(capsys, tmp_path):
    bench, args = bench_args("--record", str(tmp_path / "k.csv"))
    assert bench.run(args) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "k.csv").exists()


def test_bench_cpu_smoke_json(capsys, tmp_path):
    import json

    bench, args = bench_args(
        "--device", "cpu", "--json", "--sizes", "2x4x5x7", "--warmup", "0", "--iters", "1", "--copy-mib", "1",
        "--record", str(tmp_path / "k.csv"),
    )  # fmt: skip
    assert bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["op"], r["impl"]) for r in out["rows"]} == {(op, i) for op in bench.OPS for i in ("triton", "eager")}
    assert all(r["check"] == "ok" for r in out["rows"] if r["impl"] == "triton")
    assert all(r["ms"] > 0 and r["shape"] == "2x4x5x7" for r in out["rows"])
    assert all(r["timing"] == "host launch, 2 input copies" for r in out["rows"])
    assert not (tmp_path / "k.csv").exists(), "a CPU smoke run must not record results"
    assert bench.parse_size("sd15:12") == (12, 4, 64, 64) and bench.parse_size("sdxl:48") == (48, 4, 128, 128)
    with pytest.raises(ValueError, match="--sizes"):
        bench.parse_size("sd3:4")


def test_bench_wrapper_overhead_times_the_host_code_without_launching(capsys, tmp_path):
    import csv

    from fastlcm.bench.kernel_wrapper import stubbed_launches

    record = tmp_path / "w.csv"
    bench, args = bench_args("--wrapper-overhead", "--device", "cpu", "--sizes", "2x4x8x8,1x4x4x4", "--ops",
                             "solver,loss", "--calls", "30", "--rounds", "2", "--record", str(record))  # fmt: skip
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "launch stubbed out" in out and "solver" in out
    with record.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["shape"]) for r in rows] == [("solver", "2x4x8x8"), ("loss", "2x4x8x8"),
                                                     ("solver", "1x4x4x4"), ("loss", "1x4x4x4")]  # fmt: skip
    assert all(float(r["us_per_call"]) > 0 and r["device"] == "cpu" and r["cpu"] for r in rows)
    from fastlcm.kernels import solver

    original = dispatch.TritonKernel.__getitem__
    with stubbed_launches():  # a launch without any kernel argument returns instead of running (or failing)
        assert solver._solver_kernel[(1, 1)](device=torch.device("cpu")) is None
    assert dispatch.TritonKernel.__getitem__ is original
    with pytest.raises(TypeError):  # the real launcher wants the kernel's arguments
        solver._solver_kernel[(1, 1)](device=torch.device("cpu"))
    bench, args = bench_args("--wrapper-overhead", "--rounds", "0")
    assert bench.run(args) == 2


def test_bench_rotates_input_copies_past_the_l2_cache():
    from fastlcm.bench import kernels as bench

    mib = 2**20
    # boundary_fwd moves 3 × N × 2 bytes per call: 12×4×64×64 bf16 = 1.125 MiB, so 2 × 50 MiB takes 89 copies
    def copies(op, numel, warm=False):  # bf16: 2 bytes per element
        return bench.input_copies(bench.IDEAL_BYTES[op] * numel * 2, 50 * mib, warm)

    assert copies("boundary_fwd", 12 * 4 * 64 * 64) == 89
    assert copies("solver", 48 * 4 * 128 * 128) == 5  # 24 MiB per call
    assert copies("loss", 1 * 4 * 8 * 8) == 256  # capped
    assert copies("loss", 12 * 4 * 64 * 64, warm=True) == 1
    seen = []
    call = bench.rotating([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        call()
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    cases = bench.make_cases("boundary_fwd", (2, 4, 3, 5), torch.float32, torch.device("cpu"), "l2", "epsilon",
                             compile_=False, copies=3)  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KERNELS_ENV, "torch")
        first, second, third, fourth = (cases["eager"]() for _ in range(4))
    assert not torch.equal(first, second) and not torch.equal(second, third)  # independent inputs
    assert torch.equal(first, fourth)  # back to the first copy


@pytest.mark.gpu
def test_bench_cuda_graph_timing_on_gpu(capsys, tmp_path):
    """--cuda-graph captures the ops (the loss and boundary with their backward) and times the replays."""
    import json

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bench, args = bench_args("--json", "--no-compile", "--cuda-graph", "--graph-calls", "5", "--sizes", "3x4x37x41",
                             "--warmup", "2", "--iters", "10", "--copy-mib", "64", "--record", str(tmp_path / "k.csv"))
    assert bench.run(args) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, i) for op in bench.OPS for i in ("triton", "eager")}
    assert all(r["timing"].startswith("cuda-graph replay, ") and r["ms"] > 0 for r in rows)
    assert all(r["check"] == "ok" for r in rows if r["impl"] == "triton")
    assert (tmp_path / "k.csv").read_text().count("cuda-graph replay") == len(rows)


def test_bench_cuda_graph_needs_cuda(capsys):
    bench, args = bench_args("--device", "cpu", "--no-compile", "--cuda-graph", "--no-record")
    assert bench.run(args) == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err
