"""Build steps: each optional part of a bundle (native engine, motif family, Pareto front, prompt
scorer, classifier, TensorRT engines) as one :class:`~cscompile.steps.base.Step` that checks its
flags before any work and builds a :class:`~cscompile.bundle.parts.BundlePart` from the shared
:class:`~cscompile.steps.base.BuildContext`. :mod:`cscompile.compiler.build` lists them in order.
"""
