"""One shard grammar: the Rust expansion (``fastlcm._native.expand_shards``, what every loader uses) agrees with
webdataset's (split on ``::``, then the ``braceexpand`` package; ``fastlcm.data.reference.expand_shards`` is that
oracle) on a grid of specs and on seeded random ones. Where the two differ on purpose, the test says so and why.
"""

from __future__ import annotations

import random

import pytest
from braceexpand import UnbalancedBracesError, braceexpand

from fastlcm import _native
from fastlcm.data import reference as ref
from fastlcm.errors import LoaderOptionError

GRID = [
    # numeric ranges, zero padding, descending, negative
    "/d/s-{0..3}.tar",
    "{8..11}",
    "{00000..00003}.tar",
    "{007..9}",
    "{01..10..3}",
    "{3..0}",
    "{-2..2}",
    "{2..-1}",
    "{-05..3}",
    "{-0..3}",
    "{0..-3}",
    "{-1..-10..3}",
    "{9..-9..9}",
    # letter ranges (A..Z then a..z, as braceexpand)
    "{a..e}",
    "{e..a}",
    "{Y..b}",
    "{b..Y}",
    "{Z..a}",
    "{A..z..10}",
    "{z..A..7}",
    "{a..g..2}",
    # steps: a step's sign is ignored, 0 means 1
    "{0..10..5}",
    "{10..0..5}",
    "{10..0..-3}",
    "{0..10..-4}",
    "{0..3..0}",
    # lists, nesting, several groups
    "{a,b{1..2}}",
    "{a,b}{1,2}{x,y}",
    "x{1..2}y{a,b}z",
    "python{2.{5..7},3.{2,3}}",
    "{,}",
    "{a,}",
    "{,a}",
    "{1..3,5}",
    # literals: groups that are neither a range nor a list
    "lit{x}",
    "{}",
    "a{}b",
    "x{x{1,2}}",
    "{{1..2}..3}",
    "{+1..3}",
    "{1...3}",
    "{1..3..}",
    "{ 1..3}",
    "{a..3}",
    "{aa..c}",
    "a}{b{1,2}",
    "}{",
    # escapes
    r"\{0..1\}",
    r"{a\,b,c}",
    r"a\\{1,2}",
    r"x\y",
    "x\\",
    r"{{,\\,}}.",
    # :: lists (empty parts included) and URLs with braces
    "{0..1}::{2..3}",
    "a.tar::::b.tar::",
    "::a.tar",
    "a:::b",
    "pipe:curl -s https://h.example/{0..1}.tar",
    "https://h.example/d/{000..002}.tar?x={a,b}",
    "file:///d/{a,b}/{0..1}.tar",
    # non-ASCII text
    "{é,ü}{1..2}",
    "é\\é{1,2}",
]


@pytest.mark.parametrize("spec", GRID)
def test_rust_and_braceexpand_agree(spec):
    assert _native.expand_shards(spec) == ref.expand_shards(spec)


def test_lists_of_specs_expand_each_spec():
    specs = ["a{0..1}.tar", "b.tar::c{x,y}.tar"]
    assert _native.expand_shards(specs) == ref.expand_shards(specs) == ["a0.tar", "a1.tar", "b.tar", "cx.tar", "cy.tar"]
    # A deliberate difference: webdataset passes a *list* of URLs through unexpanded; fastlcm (the loaders and the
    # oracle alike) expands every spec of a list, so `--train_shards_path_or_url` may be given several patterns.


@pytest.mark.parametrize("spec", ["{", "}", "a{b", "a}b", "lit{x}{", "{a,b", r"{a,b\}", "a{1}}"])
def test_unbalanced_braces_are_refused_naming_the_spec(spec):
    with pytest.raises(UnbalancedBracesError):
        list(braceexpand(spec))
    with pytest.raises(LoaderOptionError, match="unbalanced braces") as e:
        _native.expand_shards(spec)
    assert f"'{spec}'" in str(e.value) and "\n" not in str(e.value)


def test_empty_parts_name_no_shard():
    # A deliberate difference: webdataset would yield an empty URL for an empty `::` part; an empty URL names no
    # shard, so the Rust grammar (and the oracle) skip it.
    assert [u for part in "a::::b".split("::") for u in braceexpand(part)] == ["a", "", "b"]
    assert _native.expand_shards("a::::b") == ref.expand_shards("a::::b") == ["a", "b"]
    for nothing in ["", "::", [], ["", "::"]]:
        with pytest.raises(LoaderOptionError, match="expands to no shard"):
            _native.expand_shards(nothing)


@pytest.mark.parametrize("spec", ["{0..99999999999}", "/d/{0..9999}/{0..9999}.tar", "{a,b}{0..5000000}x",
                                  "ok.tar::{0..3}{0..3}{0..999999}"])
def test_oversize_expansions_are_refused_naming_the_spec(spec):
    # braceexpand is lazy and has no bound, so only the Rust side is checked here: it counts before it expands.
    with pytest.raises(LoaderOptionError, match="expands to more than 10000000 URLs") as e:
        _native.expand_shards(spec)
    assert f"'{spec}'" in str(e.value)


def test_deliberate_differences_outside_ascii_ranges():
    # braceexpand's range regex uses `\d` (any Unicode digit) and `$` (which also matches before a final newline);
    # the Rust grammar takes ranges of ASCII digits only and keeps such groups literal: no shard set is named
    # that way, and a newline in a spec is a mistake to show, not to drop.
    assert list(braceexpand("{١..٣}")) == ["1", "2", "3"]
    assert _native.expand_shards("{١..٣}") == ["{١..٣}"]
    assert list(braceexpand("{1..3\n}")) == ["1", "2", "3"]
    assert _native.expand_shards("{1..3\n}") == ["{1..3\n}"]
    # Bounds past 38 digits (beyond i128) are refused; Python's ints would make such a range unbounded anyway.
    with pytest.raises(LoaderOptionError, match="more than 38 digits"):
        _native.expand_shards("{0.." + "9" * 39 + "}")


@pytest.mark.parametrize("alphabet", ["{{}},,..a0-1Z\\x", "{}..,00-12a:b", "{{}}::..,0-9cC\\é"])
def test_random_specs_agree(alphabet):
    rng = random.Random(alphabet)
    for _ in range(3000):
        spec = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        try:
            want = ref.expand_shards(spec)
        except UnbalancedBracesError:
            with pytest.raises(LoaderOptionError, match="unbalanced"):
                _native.expand_shards(spec)
            continue
        if not want:
            with pytest.raises(LoaderOptionError, match="no shard"):
                _native.expand_shards(spec)
            continue
        assert _native.expand_shards(spec) == want, spec
