"""Models used by the LFR paper and the robustness literature."""

from .small_cnn import SmallCNN

__all__ = ["SmallCNN"]
