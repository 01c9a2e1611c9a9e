"""Compressed sensing of unit supports: measurement operators, sparse solvers, support utilities.

``y = Φ f(h)`` measures the hidden state; with a calibrated dictionary ``D`` (``f ≈ D α``,
``α`` structured-sparse over units) the support of ``α`` is recovered from ``y`` by OMP,
CoSaMP or a fixed number of (F)ISTA steps with a group penalty, or predicted directly by a
least-squares sketch decoder. Everything here is numpy, small and deterministic.
"""

from __future__ import annotations

from cscompile.recovery.operators import MeasurementOperator
from cscompile.recovery.solvers import SketchDecoder, cosamp, fista_group, omp
from cscompile.recovery.supports import block_scores, energy_support, support_f1, topk_support

__all__ = [
    "MeasurementOperator",
    "SketchDecoder",
    "block_scores",
    "cosamp",
    "energy_support",
    "fista_group",
    "omp",
    "support_f1",
    "topk_support",
]
