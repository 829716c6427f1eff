"""`fastlcm make-shards`: WebDataset shards from an image folder or synthetic images
(:mod:`fastlcm.data.make_shards`)."""

from __future__ import annotations

from fastlcm.cli import fail
from fastlcm.errors import FastlcmError


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images with side-car <stem>.txt captions")
    src.add_argument("--synthetic", type=int, metavar="N", help="write N synthetic captioned images instead")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument(
        "--format",
        choices=("jpg", "png", "webp"),
        default=None,
        help="image format; folder mode re-encodes to it (default: copy bytes as they are), synthetic default jpg",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality 1-100 (default 90)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    parser.add_argument("--min-size", type=int, default=512, help="synthetic: smallest side length in px (512)")
    parser.add_argument("--max-size", type=int, default=1024, help="synthetic: largest side length in px (1024)")
    parser.add_argument(
        "--missing-caption",
        choices=("error", "skip", "empty"),
        default="error",
        help="folder mode, image without <stem>.txt: stop with an error (default), skip it, or use ''",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with the same names")


def run(args) -> int:
    from fastlcm.data.make_shards import brace_spec, write_shards

    try:
        writer = write_shards(args)
    except FastlcmError as exc:
        return fail("make-shards", exc, 2)
    except OSError as exc:
        return fail("make-shards", f"{exc.filename or ''}: {exc.strerror or exc}", 2)
    print(f"wrote {writer.samples} samples in {len(writer.paths)} shard(s): {brace_spec(writer.paths)}")
    return 0
