"""Benchmarks: every cost of the pipeline as a ratio against its floor, measured in one run.

Absolute timings mean little on a shared machine, so every timed figure is a ratio of variants
run in the same process, interleaved round by round, median against median; peak memory is
measured per variant in a fresh child process (:mod:`.timing`). One figure is absolute by design:
the whole Stage 1 pipeline's tokens/s with an instant stub teacher (:mod:`.stage1`).

:func:`run_all` runs everything and returns one JSON-able dict; ``stages/bench.py`` prints it and
writes ``bench.json`` and ``bench.md`` (:func:`to_markdown`).

Modules: :mod:`.sizes` (what each measurement runs on), :mod:`.timing` (interleaved timing, peak
RSS, the child processes), :mod:`.loss_path` (synthetic loss path), :mod:`.stage1` (Stage 1 with
the real model and at scale with a stub teacher), :mod:`.storage` (zstd levels, storage variants),
:mod:`.stage2` (Stage 2 steps and memory), :mod:`.report` (figures, Markdown), :mod:`.run` (the
whole run).
"""

from ..machine import machine_info  # mol.experiment imports it from here
from .report import FIGURE_IDS, VLLM_FIGURE_IDS, json_safe, to_markdown
from .run import SECTIONS, run_all

__all__ = ["FIGURE_IDS", "VLLM_FIGURE_IDS", "SECTIONS", "json_safe", "machine_info", "run_all", "to_markdown"]
