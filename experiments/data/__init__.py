"""Input data: corpus, record sources, tokenizers, the grain pipeline and its config, seqio bridge."""
