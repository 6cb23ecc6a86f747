"""Data: read text, tokenize once (cached), pack into blocks, split, seeded order; the default corpus."""
from .corpus import BlockOrder, read_documents, split_blocks, to_blocks, tokenize_sources
from .default import build_default_corpus, default_corpus

__all__ = ["BlockOrder", "read_documents", "split_blocks", "to_blocks", "tokenize_sources",
           "build_default_corpus", "default_corpus"]
