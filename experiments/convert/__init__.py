"""Checkpoint conversion: dense -> MoE upcycling and importing external dense models."""
