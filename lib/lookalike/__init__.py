"""lookalike: a nightly Spark pipeline from an image catalog to visual-similarity tables.

Data flow, one module per step: catalog -> embed -> index -> similar / recommend -> nightly.
See ARCHITECTURE.md beside this file.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`lookalike.Searcher`, imported on first use: `import lookalike` stays free of torch and faiss."""
    if name == "Searcher":
        from lookalike.search.searcher import Searcher

        return Searcher
    raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
