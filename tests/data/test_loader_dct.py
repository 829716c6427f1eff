"""``dct_scaling=True`` (reduced-scale JPEG decode + fast chroma upsampling) against the full decode.

On photo-like synthetic 512-1024 px JPEGs (quality 90) both paths read the same shard with the same seed and a
center crop, so the crops cover the same window of the same resized image. The opt-in path must give identical
shapes and metadata (original sizes, crop coordinates, flips, keys) and pixels within 2 levels mean absolute
error and above 38 dB PSNR of the full decode. The opt-in path decodes at 1/2, 1/4 or 1/8 only when the scaled
short side stays >= 1.25 R, so sizes are picked such that R=256 decodes the >= 640 px ones at 1/2 and the 1300 px
one at 1/4, R=384 the >= 960 px ones at 1/2, and R=512 only the 1300 px one at 1/2; images decoded at full
scale must come out bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastlcm import testing
from fastlcm.data import ShardLoader

# (height, width): short sides 512..1024, both orientations, non-multiples of 8 and of the DCT scale.
SIZES = ((512, 640), (768, 1024), (601, 900), (1024, 700), (1024, 1024), (1030, 1021), (1300, 1400))
# Images decoded at reduced scale per R (by index into SIZES).
SCALED = {256: {1, 3, 4, 5, 6}, 384: {4, 5, 6}, 512: {6}}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    out = tmp_path_factory.mktemp("dct")
    (path,) = testing.make_tiny_shards(out, num_samples=len(SIZES), samples_per_shard=len(SIZES), sizes=SIZES)
    return str(path)


def read_all(spec: str, resolution: int, dct_scaling: bool) -> dict:
    loader = ShardLoader(
        spec,
        len(SIZES),
        resolution,
        seed=3,
        shuffle_buffer=0,
        threads=1,
        crop="center",
        random_flip=True,
        dct_scaling=dct_scaling,
        pin_memory=False,
    )
    (batch,) = list(loader)
    return dict(
        keys=list(batch.keys),
        pixels=batch.pixels.float().numpy(),
        original_sizes=batch.original_sizes.numpy(),
        crop_coords=batch.crop_coords.numpy(),
        flipped=np.asarray(batch.flipped),
    )


@pytest.mark.parametrize("resolution", sorted(SCALED))
def test_dct_scaling_matches_full_decode(shard, resolution):
    full = read_all(shard, resolution, dct_scaling=False)
    fast = read_all(shard, resolution, dct_scaling=True)
    assert fast["keys"] == full["keys"]
    assert fast["pixels"].shape == full["pixels"].shape == (len(SIZES), 3, resolution, resolution)
    np.testing.assert_array_equal(fast["original_sizes"], full["original_sizes"])
    np.testing.assert_array_equal(fast["original_sizes"], np.array(SIZES))
    np.testing.assert_array_equal(fast["crop_coords"], full["crop_coords"])
    np.testing.assert_array_equal(fast["flipped"], full["flipped"])
    for i, key in enumerate(full["keys"]):
        # [-1, 1] → 8-bit levels.
        a = (full["pixels"][i].astype(np.float64) + 1) * 127.5
        b = (fast["pixels"][i].astype(np.float64) + 1) * 127.5
        mae = np.abs(a - b).mean()
        mse = ((a - b) ** 2).mean()
        psnr = 10 * np.log10(255.0**2 / mse) if mse > 0 else np.inf
        assert mae < 2.0, f"{key} {SIZES[i]} R={resolution}: mean abs error {mae:.3f} levels"
        assert psnr > 38.0, f"{key} {SIZES[i]} R={resolution}: PSNR {psnr:.2f} dB"
        # Full-scale decodes are untouched; reduced-scale ones really took the other path.
        assert (mae > 0) == (i in SCALED[resolution]), f"{key} {SIZES[i]} R={resolution}: mae {mae}"
