"""lookalike: a nightly Spark pipeline from an image catalog to visual-similarity tables.

Data flow, one module per step: catalog -> embed -> index -> similar / recommend -> nightly.
See ARCHITECTURE.md beside this file.
"""

__version__ = "0.1.0"
