"""Evaluation harness: perplexity in windows, the shipped prompt set, timing and memory."""
