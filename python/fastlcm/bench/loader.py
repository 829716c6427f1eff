"""`fastlcm bench loader`: images/s of the Rust ShardLoader, optionally against webdataset + PIL, and vs decode.

Three measurements over the same shards, in one run:

1. fastlcm: one ``ShardLoader`` with ``--threads N`` (no worker processes), ``--seconds S`` after warm-up batches.
2. ``--vs-webdataset``: the webdataset + PIL pipeline of diffusers' LCM scripts with the same transform (resize short
   side, random crop, normalize) in a torch ``DataLoader`` with N worker processes — the same core count.
3. Pure decode on one core: PIL decode (no draft mode, no resize) of the shards' images, and PIL's resize of them,
   so the loader's per-image cost can be stated as a multiple of the JPEG decode alone.

CPU seconds per image are read from /proc for the loader process and each DataLoader worker, so the comparison
per core does not depend on other load on the machine as much as the wall-clock rates do.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

from fastlcm.bench.common import append_csv, csv_header_error, machine_info

CSV_COLUMNS = (
    "date", "commit", "cpu", "cores", "threads", "resolution", "batch_size", "seconds", "dct_scaling", "images_desc",
    "decode_mean_megapixels",
    "fastlcm_images_per_s", "fastlcm_cpu_s_per_image", "webdataset_images_per_s", "webdataset_cpu_s_per_image",
    "ratio", "ratio_cpu", "decode_images_per_s_1core", "resize_images_per_s_1core", "loader_over_decode",
    "loader_over_decode_wall", "load_avg_1min", "command",
)  # fmt: skip


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", metavar="SPEC", help="shard spec (brace ranges, '::' lists, paths, URLs)")
    src.add_argument("--synthetic", type=int, metavar="N", help="make N synthetic JPEGs in a temporary folder")
    parser.add_argument("--min-size", type=int, default=512, help="--synthetic: smallest side in px (512)")
    parser.add_argument("--max-size", type=int, default=1024, help="--synthetic: largest side in px (1024)")
    parser.add_argument("--resolution", type=int, default=512, help="output size R (default 512)")
    parser.add_argument("--batch-size", type=int, default=12, help="batch size (default 12)")
    parser.add_argument("--threads", type=int, default=None, help="decode threads = webdataset workers (all cores)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per pipeline (default 10)")
    parser.add_argument("--warmup-batches", type=int, default=2, help="batches discarded before timing (2)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="shuffle buffer of both pipelines (1000)")
    parser.add_argument("--dct-scaling", action="store_true", help="let fastlcm decode JPEGs at reduced DCT scale")
    parser.add_argument("--vs-webdataset", action="store_true", help="also measure webdataset + PIL, same cores")
    parser.add_argument("--decode-images", type=int, default=48, help="images timed for pure decode, 0 = skip (48)")
    parser.add_argument("--label", help="describes the images in the report and CSV (default: the shard spec)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    parser.add_argument("--out-csv", metavar="PATH", help="append a result row to this CSV (e.g. benches/results/loader.csv)")


# ----------------------------------------------------------------------------------------------------------------
# CPU time of processes
# ----------------------------------------------------------------------------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def _timed(iterator, batch_size: int, seconds: float, warmup: int, pids=lambda: [os.getpid()]) -> dict:
    for _ in range(warmup):
        next(iterator)
    procs = pids()
    cpu0 = sum(_proc_cpu_s(p) for p in procs)
    t0 = time.perf_counter()
    images = 0
    while time.perf_counter() - t0 < seconds:
        next(iterator)
        images += batch_size
    wall = time.perf_counter() - t0
    cpu = sum(_proc_cpu_s(p) for p in procs) - cpu0
    return {"images": images, "wall_s": wall, "images_per_s": images / wall, "cpu_s_per_image": cpu / max(images, 1)}


def measure_fastlcm(spec: str, args, threads: int) -> dict:
    from fastlcm.data import ShardLoader

    loader = ShardLoader(
        spec, args.batch_size, args.resolution, threads=threads, epochs=None, shuffle_buffer=args.shuffle_buffer,
        dct_scaling=args.dct_scaling, pin_memory=False,
    )  # fmt: skip
    out = _timed(iter(loader), args.batch_size, args.seconds, args.warmup_batches)
    out["stats"] = loader.stats()
    return out


def measure_webdataset(spec: str, args, workers: int) -> dict:
    import torch

    from fastlcm.data.reference import webdataset_pipeline

    pipe = webdataset_pipeline(spec, args.batch_size, args.resolution, shuffle_buffer=args.shuffle_buffer)
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers, prefetch_factor=2)
    iterator = iter(loader)

    def pids():
        return [os.getpid()] + [w.pid for w in getattr(iterator, "_workers", [])]

    try:
        return _timed(iterator, args.batch_size, args.seconds, args.warmup_batches, pids)
    finally:
        del iterator


def measure_decode(spec: str, resolution: int, limit: int) -> dict | None:
    """Single-core PIL decode (``load()``, no draft) and PIL resize of up to ``limit`` images from local shards."""
    from PIL import Image

    from fastlcm.data import reference as ref

    images: list[bytes] = []
    for url in ref.expand_shards(spec):
        try:
            data = ref.local_path(url).read_bytes()
        except (ValueError, OSError):
            return None
        for _, exts in ref.group_members(ref.iter_members(data)):
            ext = next((e for e in ref.IMAGE_EXTS if e in exts), None)
            if ext is not None:
                images.append(exts[ext])
            if len(images) >= limit:
                break
        if len(images) >= limit:
            break
    if not images:
        return None
    # CPU time of this thread, so that other load on the machine does not inflate the single-core figures
    decoded, pixels = [], 0
    for data in images[:4]:  # warm-up: library initialisation and first page faults are not decode time
        Image.open(io.BytesIO(data)).load()
    t0 = time.thread_time()
    for data in images:
        im = Image.open(io.BytesIO(data))
        im.load()
        decoded.append(im)
    decode_s = time.thread_time() - t0
    t0 = time.thread_time()
    for im in decoded:
        nh, nw = ref.resized_size(im.height, im.width, resolution)
        im.resize((nw, nh), Image.BILINEAR)
        pixels += im.width * im.height
    resize_s = time.thread_time() - t0
    formats = sorted({im.format or "?" for im in decoded})
    return {
        "images": len(images),
        "decode_images_per_s": len(images) / decode_s,
        "resize_images_per_s": len(images) / resize_s,
        "mean_megapixels": pixels / len(images) / 1e6,
        "formats": formats,
    }


def make_synthetic(args) -> tuple[str, Path]:
    from fastlcm.data.make_shards import ShardWriter, brace_spec, synthetic_samples

    tmp = Path(tempfile.mkdtemp(prefix="fastlcm-bench-"))
    ns = Namespace(synthetic=args.synthetic, seed=0, format="jpg", quality=90, min_size=args.min_size,
                   max_size=args.max_size)  # fmt: skip
    writer = ShardWriter(tmp, "bench-", max(1, args.synthetic // 8), overwrite=True)
    for key, members in synthetic_samples(ns):
        writer.add(key, members)
    writer.close()
    return brace_spec(writer.paths), tmp


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _r(x, nd=2):
    return None if x is None else round(x, nd)


def run(args) -> int:
    for flag, value, low in (("--resolution", args.resolution, 1), ("--batch-size", args.batch_size, 1),
                             ("--warmup-batches", args.warmup_batches, 0), ("--decode-images", args.decode_images, 0)):  # fmt: skip
        if value < low:
            print(f"fastlcm bench loader: error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if args.seconds <= 0 or (args.threads is not None and args.threads < 1):
        print("fastlcm bench loader: error: --seconds must be > 0 and --threads >= 1", file=sys.stderr)
        return 2
    error = csv_header_error(args.out_csv, CSV_COLUMNS)
    if error:
        print(f"fastlcm bench loader: error: --out-csv {error}", file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0))
    tmp = None
    try:
        if args.synthetic is not None:
            if args.synthetic < args.batch_size:
                print("fastlcm bench loader: error: --synthetic must be >= --batch-size", file=sys.stderr)
                return 2
            spec, tmp = make_synthetic(args)
            images_desc = args.label or f"synthetic {args.synthetic} JPEG q90 {args.min_size}-{args.max_size}px"
        else:
            spec, images_desc = args.shards, args.label or args.shards
        info = machine_info()
        result: dict = {**info, "threads": threads, "resolution": args.resolution, "batch_size": args.batch_size,
                        "seconds": args.seconds, "dct_scaling": args.dct_scaling, "shards": spec,
                        "images_desc": images_desc}  # fmt: skip
        # decode first: no loader threads or DataLoader workers are alive yet to share the core with it
        dec = measure_decode(spec, args.resolution, args.decode_images) if args.decode_images else None
        fast = measure_fastlcm(spec, args, threads)
        wds_r = measure_webdataset(spec, args, threads) if args.vs_webdataset else None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    result["fastlcm_images_per_s"] = _r(fast["images_per_s"])
    result["fastlcm_cpu_s_per_image"] = _r(fast["cpu_s_per_image"], 5)
    result["fastlcm_stats"] = fast["stats"]
    result["webdataset_images_per_s"] = _r(wds_r["images_per_s"]) if wds_r else None
    result["webdataset_cpu_s_per_image"] = _r(wds_r["cpu_s_per_image"], 5) if wds_r else None
    result["ratio"] = _r(fast["images_per_s"] / wds_r["images_per_s"]) if wds_r else None
    result["ratio_cpu"] = (
        _r(wds_r["cpu_s_per_image"] / fast["cpu_s_per_image"]) if wds_r and fast["cpu_s_per_image"] > 0 else None
    )
    if dec:
        result["decode_images_per_s_1core"] = _r(dec["decode_images_per_s"])
        result["resize_images_per_s_1core"] = _r(dec["resize_images_per_s"])
        result["decode_mean_megapixels"] = _r(dec["mean_megapixels"], 3)
        # loader CPU seconds per image over PIL decode CPU seconds per image (1.0 = as cheap as decoding alone);
        # the wall-clock form (threads / images_per_s) is also kept, it is only meaningful on an idle machine
        result["loader_over_decode"] = _r(fast["cpu_s_per_image"] * dec["decode_images_per_s"])
        result["loader_over_decode_wall"] = _r(threads / fast["images_per_s"] * dec["decode_images_per_s"])
    argv = sys.argv[3:] if sys.argv[1:3] == ["bench", "loader"] else sys.argv[1:]
    result["command"] = "fastlcm bench loader " + shlex.join(argv)
    if args.out_csv:
        append_csv(args.out_csv, [result], CSV_COLUMNS)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"machine: {info['cpu']}, {info['cores']} cores available, load average {info['load_avg_1min']}; "
          f"commit {info['commit']}; {info['date']}")
    print(f"shards: {images_desc}; R={args.resolution}, batch {args.batch_size}, {threads} thread(s)/worker(s), "
          f"{args.seconds:g} s each after {args.warmup_batches} warm-up batches")  # fmt: skip
    print(f"fastlcm ShardLoader:  {fast['images_per_s']:8.1f} images/s  ({fast['cpu_s_per_image'] * 1e3:.1f} "
          f"CPU ms/image)")  # fmt: skip
    if wds_r:
        print(f"webdataset + PIL:     {wds_r['images_per_s']:8.1f} images/s  ({wds_r['cpu_s_per_image'] * 1e3:.1f} "
              f"CPU ms/image, {threads} DataLoader workers)")  # fmt: skip
        print(f"ratio fastlcm/webdataset: {result['ratio']}x wall-clock, {result['ratio_cpu']}x per CPU second")
    if dec:
        print(f"PIL on one core over {dec['images']} images ({', '.join(dec['formats'])}, "
              f"{dec['mean_megapixels']:.2f} MP mean), per CPU second: decode {dec['decode_images_per_s']:.1f} "
              f"images/s, resize {dec['resize_images_per_s']:.1f} images/s")  # fmt: skip
        print(f"loader time per image / PIL decode time per image: {result['loader_over_decode']} (CPU time), "
              f"{result['loader_over_decode_wall']} (wall-clock x threads)")  # fmt: skip
    if args.out_csv:
        print(f"appended a row to {args.out_csv}")
    return 0
