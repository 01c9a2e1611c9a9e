"""Prompt compression: question-aware token scores from the model's own first layers, a budget
controller (sentences, then words), and the scorer's calibration and packaging.
"""

from cscompile.prompt.compress import (
    CompressedPrompt,
    PromptBudget,
    PromptCompressor,
    PromptLayout,
    layout,
    select,
    split_prompt,
)
from cscompile.prompt.scorer import PromptScorer, ScorerSpec, build_scorer

__all__ = [
    "CompressedPrompt",
    "PromptBudget",
    "PromptCompressor",
    "PromptLayout",
    "PromptScorer",
    "ScorerSpec",
    "build_scorer",
    "layout",
    "select",
    "split_prompt",
]
