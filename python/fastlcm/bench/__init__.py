"""`fastlcm bench loader|kernels|step` (:mod:`fastlcm.cli.bench` dispatches): benchmarks that print what they
measured and on which machine, and append stamped rows to ``benches/results/*.csv`` when asked (:mod:`.common`).

Each benchmark module exposes ``add_arguments(parser)`` (torch-free at import, like the commands) and
``run(args) -> int``.
"""
