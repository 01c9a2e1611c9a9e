"""Graph passes on the ONNX IR (onnx-ir): one pass a file, each with numbered rules.

- :class:`CanonicalizePass`: unused-node removal, constant folding, initializer dedupe, shapes, sort.
- :class:`DiscoverUnitsPass`: the unit map by dataflow (analysis; graph unchanged).
- :class:`AlignPass`: FFN block size for a target (analysis; graph unchanged).
- :class:`PermuteFFNPass`: function-preserving FFN channel permutation.
- :class:`InstrumentPass`: calibration outputs (feature, FFN intermediate, unit activities).

The order they run in is written once, in :mod:`cscompile.passes.pipeline`.
"""

from __future__ import annotations

from cscompile.passes.align import AlignPass, admissible_block_sizes, check_block_size
from cscompile.passes.canonicalize import CanonicalizePass
from cscompile.passes.discover import DiscoveryError, discover_units
from cscompile.passes.discover_pass import META_KEY, DiscoverUnitsPass
from cscompile.passes.instrument import InstrumentPass
from cscompile.passes.permute import PermuteFFNPass
from cscompile.passes.unit_map import UNIT_MAP_VERSION, UnitMap

__all__ = [
    "META_KEY",
    "UNIT_MAP_VERSION",
    "AlignPass",
    "CanonicalizePass",
    "DiscoverUnitsPass",
    "DiscoveryError",
    "InstrumentPass",
    "PermuteFFNPass",
    "UnitMap",
    "admissible_block_sizes",
    "check_block_size",
    "discover_units",
]
