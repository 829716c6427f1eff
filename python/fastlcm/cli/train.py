"""`fastlcm train`: one flag per :class:`fastlcm.config.TrainConfig` field, with diffusers' names (see
:mod:`fastlcm.cli.flags`); the run is :func:`fastlcm.training.loop.train`."""

from __future__ import annotations

import argparse

from fastlcm.cli import fail
from fastlcm.cli.flags import add_config_arguments, from_args
from fastlcm.errors import FastlcmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = from_args(args).validate()
    except FastlcmError as e:
        return fail("train", e, 2)
    from fastlcm.training.loop import train
    from fastlcm.training.preflight import preflight

    try:
        family = preflight(cfg)
    except FastlcmError as e:
        return fail("train", e, 2)
    try:
        train(cfg, family)
    except FastlcmError as e:
        return fail("train", e, 1)
    return 0
