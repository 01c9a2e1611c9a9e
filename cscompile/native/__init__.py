"""The native engine: the source model's block-quantized weights run by one C call per token.

``engine`` (ctypes ABI, packing, weights, decoder, session, bundle I/O), ``switch`` (motifs of
the native step switched per token over one cache), ``csrc/qdecode.c`` (the kernel).
"""
