"""cscompile: compressed-sensing-guided, inference-aware structured reduction for decoder LLMs.

Import root of the package. Sub-packages:

- ``cscompile.compiler``: the build; ``cscompile.cli``: the command.
- ``cscompile.passes``: graph passes on the ONNX IR.
- ``cscompile.native``: the native C decode step; ``cscompile.steps``: build steps; ``cscompile.decode``: sessions.
- ``cscompile.runtime``: loading bundles, the engine registry.
- ``cscompile.motifs``: motif family enumeration and selection.
- ``cscompile.models``: the model zoo (fetch, convert, export) and tiny test models.
- ``cscompile.evaluation``: timing harness, peers, reports (docs/design.md "Layers").

Heavy optional packages (torch, transformers, tensorrt) are imported lazily, inside the
functions that need them, so ``import cscompile.runtime`` works on a machine without them.
"""

from __future__ import annotations

from cscompile.errors import CscompileError, UserError

__version__ = "0.1.0"

__all__ = ["CscompileError", "UserError", "__version__"]
