"""Reporting: metric sinks, run summaries, routing analysis and sweeps."""
