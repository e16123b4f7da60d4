"""Inference on trained or imported workdirs: scoring (log-probabilities)."""
