"""Data shipped with the package: the prompt set, the long-context haystack, sentiment sets."""
