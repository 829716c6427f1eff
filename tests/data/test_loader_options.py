"""One declaration of loader options end to end, the error classes from one root, and the checked buffer handover.

``LoaderOptions`` (Python) holds the only Python defaults and checks types; the Rust core holds the same defaults
(``_native.loader_defaults()``) and every range rule. The two copies of the defaults are compared here field by
field, so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import typing

import pytest
import torch

import fastlcm.data
import fastlcm.errors
from fastlcm import _native
from fastlcm.data import LatentShardLoader, LoaderOptions, ShardLoader
from fastlcm.data.options import AUTO_FIELDS, available_cores
from fastlcm.errors import (
    FastlcmError,
    LoaderError,
    LoaderOptionError,
    LoaderStateError,
    ShardNotFoundError,
    ShardPermissionError,
    ShardSourceError,
)
from fastlcm.testing import make_tiny_shards

R = 16
LOADER_ERRORS = [name for name, cls in vars(fastlcm.errors).items()
                 if isinstance(cls, type) and issubclass(cls, LoaderError)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return [str(p) for p in make_tiny_shards(d, num_samples=8, samples_per_shard=4, seed=3)]


def native_options(**kw) -> LoaderOptions:
    """Options as the loaders hand them to the core: "auto" values resolved."""
    return LoaderOptions(**{"batch_size": 2, "resolution": R, **kw}).resolve(default_threads=1, cuda_available=False)


# ---- defaults ----------------------------------------------------------------------------------------------------


def test_python_defaults_equal_the_core_defaults():
    core = _native.loader_defaults()
    concrete = {f.name: f.default for f in dataclasses.fields(LoaderOptions)
                if f.default is not dataclasses.MISSING and f.name not in AUTO_FIELDS}
    assert set(core) - set(AUTO_FIELDS) == set(concrete), "the same options on both sides"
    for name, default in concrete.items():
        assert core[name] == default and type(core[name]) is type(default), name
    assert {f.name for f in dataclasses.fields(LoaderOptions) if f.default is dataclasses.MISSING} == {"batch_size"}
    assert all(getattr(LoaderOptions(batch_size=1), name) is None for name in AUTO_FIELDS)


def test_every_field_is_documented_and_choices_are_literals():
    source = inspect.getsource(LoaderOptions)
    for f in dataclasses.fields(LoaderOptions):
        assert f'    {f.name}:' in source and source.split(f"    {f.name}:", 1)[1].split("\n", 2)[1].strip().startswith(
            '"""'), f"{f.name} has no docstring"
    hints = typing.get_type_hints(LoaderOptions)
    assert {n for n, h in hints.items() if typing.get_origin(h) is typing.Literal} == {"crop", "dtype", "on_error"}


def test_every_literal_choice_is_a_core_choice(shards):
    hints = typing.get_type_hints(LoaderOptions)
    for name in ("crop", "dtype", "on_error"):
        choices = typing.get_args(hints[name])
        for choice in choices:
            _native.Loader(shards, native_options(**{name: choice}))
        with pytest.raises(LoaderOptionError, match=name) as e:
            _native.Loader(shards, native_options(**{name: "nope"}))
        assert all(f"'{c}'" in str(e.value) for c in choices), "the core lists the same choices"


# ---- types (Python) and ranges (Rust) ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(batch_size="2"), "batch_size"),
    (dict(seed=True), "seed"),
    (dict(threads=1.5), "threads"),
    (dict(crop=1), "crop"),
    (dict(random_flip=1), "random_flip"),
    (dict(pin_memory="yes"), "pin_memory"),
    (dict(http_timeout_s="30"), "http_timeout_s"),
    (dict(max_pwatermark=True), "max_pwatermark"),
    (dict(epochs=1.0), "epochs"),
])
def test_wrong_types_are_refused_naming_the_field(kwargs, name):
    with pytest.raises(LoaderOptionError, match=f"LoaderOptions.{name} must be") as e:
        LoaderOptions(**{"batch_size": 1, **kwargs})
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_numbers_of_either_kind_are_fine_where_a_float_is_expected():
    assert LoaderOptions(batch_size=1, http_timeout_s=5, max_pwatermark=1).http_timeout_s == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(resolution=16385), "resolution must be in 1..=16384"),
    (dict(shuffle_buffer=-1), "shuffle_buffer: must be >= 0, got -1"),
    (dict(http_retries=2**40), "http_retries: is too large"),
    (dict(epochs=0), "epochs must be >= 1 or None"),
    (dict(http_timeout_s=float("nan")), "http_timeout_s must be a finite number"),
    (dict(world_size=0), "world_size must be >= 1"),
])
def test_ranges_are_the_cores_one_line_errors(shards, kwargs, message):
    opts = native_options(**kwargs)
    with pytest.raises(LoaderOptionError, match=message) as e:
        _native.Loader(shards, opts)
    assert str(e.value).startswith("invalid argument: ") and "\n" not in str(e.value)


def test_any_int_seed_uses_its_low_64_bits(shards):
    state = lambda seed: ShardLoader(shards, 2, R, seed=seed).state_dict()["config"]["seed"]  # noqa: E731
    assert state(-1) == state(2**64 - 1) == 2**64 - 1
    assert state(2**64 + 5) == 5


def test_auto_values_are_resolved_from_the_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = ShardLoader(shards, 2, R)
    assert (loader.rank, loader.world_size, loader.threads) == (1, 2, available_cores())
    assert loader.options.pin_memory is torch.cuda.is_available() and loader.pin_memory is loader.options.pin_memory
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LoaderOptionError, match="RANK='x'"):
        ShardLoader(shards, 2, R)


# ---- the loaders over one options object --------------------------------------------------------------------------


def test_from_options_is_the_keyword_form(shards, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    opts = LoaderOptions(batch_size=2, resolution=R, seed=5, shuffle_buffer=3, dtype="uint8", threads=2)
    a, b = ShardLoader.from_options(shards, opts), ShardLoader(shards, 2, R, seed=5, shuffle_buffer=3, dtype="uint8",
                                                                threads=2)
    assert a.options == b.options == opts.resolve(default_threads=0, cuda_available=torch.cuda.is_available())
    assert (a.dtype, a.resolution, a.batch_size) == (torch.uint8, R, 2)
    assert [x.keys for x in a] == [x.keys for x in b]
    with pytest.raises(LoaderOptionError, match="LatentShardLoader"):
        ShardLoader.from_options(shards, dataclasses.replace(opts, raw=True))
    with pytest.raises(LoaderOptionError, match="LoaderOptions"):
        ShardLoader.from_options(shards, {"batch_size": 2})
    with pytest.raises(TypeError, match="no_such_option"):
        ShardLoader(shards, 2, R, no_such_option=1)


def test_latent_loader_runs_the_same_options_in_raw_mode(shards):
    opts = LoaderOptions(batch_size=2, resolution=1024, seed=1)
    lat = LatentShardLoader.from_options(shards, opts, expect_family="sd")
    assert lat.options.raw is True and lat.options.seed == 1 and lat.threads == min(4, available_cores())
    assert LatentShardLoader(shards, 2, threads=3).options == dataclasses.replace(lat.options, resolution=512, seed=0,
                                                                                 threads=3)
    # Raw-mode state dicts keep recording resolution 8, whatever the (unused) resolution option says.
    config = lat.state_dict()["config"]
    assert config["resolution"] == 8 and config["raw"] == 1


def test_signatures_list_the_option_keywords():
    params = inspect.signature(ShardLoader).parameters
    assert list(params)[:3] == ["shards", "batch_size", "resolution"]
    assert params["seed"].default == 0 and params["crop"].default == "random" and "raw" not in params
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in list(params)[3:])
    lat = inspect.signature(LatentShardLoader).parameters
    assert lat["expect_family"].default is None and lat["shuffle_buffer"].default == 1000 and "raw" not in lat


def test_urls_are_the_shard_grammar(shards):
    spec = os.path.dirname(shards[0]) + "/shard-{00000..00001}.tar"
    assert ShardLoader(spec, 2, R).urls == _native.expand_shards(spec) == shards


# ---- errors --------------------------------------------------------------------------------------------------------


def test_every_loader_error_is_one_class_everywhere():
    assert {"LoaderOptionError", "LoaderStateError", "ShardNotFoundError", "LatentFormatError"} <= set(LOADER_ERRORS)
    for name in LOADER_ERRORS:
        cls = getattr(fastlcm.errors, name)
        assert getattr(_native, name) is cls and getattr(fastlcm.data, name) is cls, name
        assert issubclass(cls, FastlcmError)
    assert issubclass(LoaderOptionError, ValueError) and issubclass(LoaderStateError, ValueError)
    assert issubclass(ShardNotFoundError, (ShardSourceError, FileNotFoundError))
    assert issubclass(ShardPermissionError, (ShardSourceError, PermissionError))


def test_a_missing_shard_is_a_file_not_found(tmp_path, shards):
    missing = str(tmp_path / "gone.tar")
    with pytest.raises(ShardNotFoundError, match="gone.tar") as e:
        list(ShardLoader([missing], 1, R, on_error="raise"))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ShardSourceError)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_shard_is_a_permission_error(tmp_path, shards):
    locked = tmp_path / "locked.tar"
    locked.write_bytes(open(shards[0], "rb").read())
    locked.chmod(0)
    with pytest.raises(ShardPermissionError, match="locked.tar"):
        list(ShardLoader([str(locked)], 1, R, on_error="raise"))


def test_bad_states_are_loader_state_errors(shards):
    state = ShardLoader(shards, 2, R, seed=1).state_dict()
    assert set(state) == {"version", "epoch", "epoch_start_position", "position", "batches_yielded", "finished",
                          "shard_counts", "config"}
    loader = ShardLoader(shards, 2, R, seed=2)
    with pytest.raises(LoaderStateError, match=r"different seed \(1\) than this one \(2\)"):
        loader.load_state_dict(state)
    with pytest.raises(LoaderStateError, match="expected 1"):
        loader.load_state_dict({**state, "version": 2})
    with pytest.raises(LoaderStateError, match="must be a dict"):
        loader.load_state_dict(json.dumps(state))


# ---- the buffer handover ------------------------------------------------------------------------------------------


def test_next_batch_takes_only_a_matching_cpu_tensor(shards):
    loader = ShardLoader(shards, 2, R, dtype="uint8", pin_memory=False, shuffle_buffer=0)
    native = loader._native
    good = (2, 3, R, R)
    for bad, message in [
        (torch.empty(good, dtype=torch.float32), "dtype torch.float32, this loader writes torch.uint8"),
        (torch.empty((2, 3, R, 2 * R), dtype=torch.uint8)[..., ::2], "not contiguous"),
        (torch.empty((1, 3, R, R), dtype=torch.uint8), f"has {3 * R * R} bytes, a batch needs {2 * 3 * R * R}"),
        (torch.empty(good, dtype=torch.uint8, device="meta"), "on meta"),
        (torch.empty(good, dtype=torch.uint8).numpy(), "must be a torch.Tensor, got numpy.ndarray"),
        (torch.empty(good, dtype=torch.uint8).data_ptr(), "must be a torch.Tensor, got builtins.int"),
    ]:
        with pytest.raises(LoaderOptionError, match=message) as e:
            native.next_batch(bad)
        assert "\n" not in str(e.value)
    assert not hasattr(native, "batch_nbytes")
    # Methods are read from the type: an instance attribute cannot redirect the write.
    decoy = torch.zeros(good, dtype=torch.uint8)
    target = torch.zeros(good, dtype=torch.uint8)
    target.data_ptr = decoy.data_ptr
    assert native.next_batch(target) is not None
    assert target.any() and not decoy.any()
    expect = next(iter(ShardLoader(shards, 2, R, dtype="uint8", pin_memory=False, shuffle_buffer=0)))
    assert torch.equal(target, expect.pixels)


def test_raw_and_image_loaders_keep_to_their_own_batches(shards):
    with pytest.raises(LoaderError, match="next_raw_batch"):
        LatentShardLoader(shards, 1)._native.next_batch(torch.empty(1))
    with pytest.raises(LoaderError, match="raw=True"):
        ShardLoader(shards, 1, R)._native.next_raw_batch()


# ---- no torch where none is needed --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [
    "import fastlcm.data.options",
    "from fastlcm.data import LoaderOptions, LoaderOptionError, ShardNotFoundError; LoaderOptions(batch_size=1)",
    "import fastlcm._native as n; n.expand_shards(['a{0..1}::b']); n.loader_defaults(); n.LoaderError",
])
def test_options_errors_and_grammar_import_no_torch(code):
    check = f"import sys; {code}; assert not {{'torch', 'numpy'}} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
