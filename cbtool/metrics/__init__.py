"""Accumulators for classification accuracy and attention density, reducible across torchrun ranks."""

from cbtool.metrics.accuracy import AccuracyAccumulator
from cbtool.metrics.density import DensityAccumulator, normalized_entropy

__all__ = ["AccuracyAccumulator", "DensityAccumulator", "normalized_entropy"]
