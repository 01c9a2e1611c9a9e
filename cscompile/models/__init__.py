"""Model zoo (fetch, convert, export, cache) and the tiny test-model registry."""
