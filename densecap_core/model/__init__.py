"""The DenseCap model (FCLN): one module per stage. Imports torch."""

from .densecap import DenseCapModel, build_model

__all__ = ["DenseCapModel", "build_model"]
