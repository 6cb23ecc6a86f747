"""Evaluation: perplexity (and, with issue 3, zero-shot tasks)."""
from .ppl import perplexity, window_nll

__all__ = ["perplexity", "window_nll"]
