"""Core math on tensors, no files: the line fit, the low-rank factorization, the formula ``W0 + s·drift``,
linearity statistics, and re-grounding on live weights. Imports nothing of driftmerge but ``errors``/``progress``."""
