"""ShardLoader order, distribution and resume: shard specs, rank/world splits, resampling, state_dict, threads."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from fastlcm import testing
from fastlcm.data import ShardLoader
from fastlcm.data import reference as ref

SIZES = ((40, 52), (56, 40), (48, 48), (64, 50))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards x 5 samples (30 keys, mixed formats) and their brace spec."""
    out = tmp_path_factory.mktemp("order")
    testing.make_tiny_shards(out, num_samples=30, samples_per_shard=5, sizes=SIZES, image_format="mixed")
    return str(out / "shard-{00000..00005}.tar"), out


def make(spec, batch_size=1, **kw):
    kw.setdefault("pin_memory", False)
    return ShardLoader(spec, batch_size, 32, **kw)


def keys_of(loader, max_batches=None):
    out = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out += batch.keys
    return out


def batches_of(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys and x.captions == y.captions and x.shards == y.shards
        assert torch.equal(x.crop_coords, y.crop_coords) and torch.equal(x.flipped, y.flipped)
        assert torch.equal(x.pixels, y.pixels)


def test_no_shuffle_is_shard_order_then_member_order(shards):
    spec, _ = shards
    oracle = [s.key for s in ref.read_samples(spec)[0]]
    assert keys_of(make(spec, shuffle_buffer=0)) == oracle


def test_spec_forms_are_equivalent(shards):
    spec, out = shards
    paths = [str(out / f"shard-{i:05d}.tar") for i in range(6)]
    want = keys_of(make(spec, shuffle_buffer=0))
    assert keys_of(make(paths, shuffle_buffer=0)) == want
    assert keys_of(make("::".join(paths), shuffle_buffer=0)) == want
    assert keys_of(make(["file://" + p for p in paths], shuffle_buffer=0)) == want
    assert keys_of(make([str(out / "shard-{00000..00002}.tar"), str(out / "shard-{00003,00004,00005}.tar")],
                        shuffle_buffer=0)) == want  # fmt: skip


def test_shuffle_is_seeded_and_complete(shards):
    spec, _ = shards
    a = keys_of(make(spec, seed=1, shuffle_buffer=10))
    assert a == keys_of(make(spec, seed=1, shuffle_buffer=10)), "same seed, same order"
    b = keys_of(make(spec, seed=2, shuffle_buffer=10))
    assert sorted(a) == sorted(b) == sorted(keys_of(make(spec, shuffle_buffer=0)))
    assert a != b, "another seed gives another order"
    assert a != sorted(a), "the order is shuffled"


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_without_duplicates(shards, world_size):
    spec, _ = shards
    everything = keys_of(make(spec, shuffle_buffer=0))
    per_rank = [keys_of(make(spec, seed=4, shuffle_buffer=6, rank=r, world_size=world_size)) for r in range(world_size)]
    union = [k for keys in per_rank for k in keys]
    assert all(per_rank), "every rank gets samples"
    assert Counter(union) == Counter(everything), "union over ranks = every sample exactly once"


def test_rank_and_world_size_from_environment(shards, monkeypatch):
    spec, _ = shards
    explicit = keys_of(make(spec, seed=4, shuffle_buffer=6, rank=1, world_size=2))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert keys_of(make(spec, seed=4, shuffle_buffer=6)) == explicit


def test_resampled_streams_are_per_rank_and_seeded(shards):
    spec, _ = shards
    n = 45  # more than the 30 samples: resampling is infinite

    def stream(seed, rank):
        return keys_of(make(spec, seed=seed, rank=rank, world_size=2, resampled=True, shuffle_buffer=5), n)

    r0, r1 = stream(0, 0), stream(0, 1)
    assert len(r0) == len(r1) == n
    assert r0 == stream(0, 0), "same seed and rank, same stream"
    assert r0 != r1, "ranks draw different streams"
    assert r0 != stream(1, 0), "the seed changes the stream"
    assert len(set(r0)) < n, "drawn with replacement"
    assert set(r0) <= set(keys_of(make(spec, shuffle_buffer=0)))


def test_epochs_repeat_and_reshuffle(shards):
    spec, _ = shards
    two = keys_of(make(spec, seed=3, shuffle_buffer=10, epochs=2))
    assert len(two) == 60 and Counter(two) == Counter({k: 2 for k in two})
    assert two[:30] != two[30:], "each epoch reshuffled with (seed, epoch)"
    forever = keys_of(make(spec, seed=3, shuffle_buffer=10, epochs=None), 75)
    assert len(forever) == 75 and forever[:60] == two


def test_partial_batch_is_dropped_and_counted(shards):
    spec, out = shards
    loader = make([str(out / "shard-00000.tar"), str(out / "shard-00001.tar")], batch_size=4, shuffle_buffer=0)
    batches = batches_of(loader)
    assert [len(b.keys) for b in batches] == [4, 4]
    stats = loader.stats()
    assert stats["skipped"]["partial_batch"] == 2
    assert stats["samples_yielded"] == 8 and stats["batches_yielded"] == 2


def test_same_batches_for_any_thread_count(shards):
    spec, _ = shards
    kw = dict(seed=7, shuffle_buffer=8, random_flip=True, batch_size=4)
    one = batches_of(make(spec, threads=1, **kw))
    assert len(one) == 7
    assert_same_batches(one, batches_of(make(spec, threads=2, **kw)))
    assert_same_batches(one, batches_of(make(spec, threads=3, **kw)))


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_resume_continues_with_the_next_batch(shards, stop_after):
    spec, _ = shards
    kw = dict(seed=11, shuffle_buffer=8, random_flip=True, batch_size=4, epochs=2)
    full = batches_of(make(spec, **kw))
    assert len(full) == 14  # 2 epochs x (30 // 4) batches: each epoch drops its partial batch; 9 is in epoch 2
    first = make(spec, **kw)
    seen = batches_of(first, stop_after)
    assert_same_batches(seen, full[:stop_after])
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip (checkpoints)
    resumed = make(spec, **kw)
    resumed.load_state_dict(state)
    assert_same_batches(batches_of(resumed), full[stop_after:])


def test_resume_of_a_resampled_stream(shards):
    spec, _ = shards
    kw = dict(seed=5, shuffle_buffer=6, resampled=True, batch_size=3, rank=1, world_size=2)
    full = batches_of(make(spec, **kw), 8)
    first = make(spec, **kw)
    batches_of(first, 3)
    resumed = make(spec, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert_same_batches(batches_of(resumed, 5), full[3:])


def test_center_crop_ignores_seed_but_random_crop_does_not(shards):
    spec, _ = shards
    c1 = batches_of(make(spec, seed=1, shuffle_buffer=0, crop="center", batch_size=5))
    c2 = batches_of(make(spec, seed=2, shuffle_buffer=0, crop="center", batch_size=5))
    assert_same_batches(c1, c2)
    r1 = torch.cat([b.crop_coords for b in batches_of(make(spec, seed=1, shuffle_buffer=0, batch_size=5))])
    r2 = torch.cat([b.crop_coords for b in batches_of(make(spec, seed=2, shuffle_buffer=0, batch_size=5))])
    assert not torch.equal(r1, r2)
