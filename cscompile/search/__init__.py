"""Joint width × depth × precision search under measured latency (issue 8): on the native engine
(:mod:`cscompile.search.native_search`) and on ONNX Runtime engines (:mod:`cscompile.search.joint`).
"""
