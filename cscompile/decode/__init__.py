"""Decoding, below every engine: the ONNX Runtime decoder session, the KV cache, the decode loop
and sampling, the I/O spec and the tokenizer. Engines build on it; :mod:`cscompile.runtime`
(loading bundles, choosing an engine) sits above the engines and re-exports the public names.
"""
