"""The trainer's data settings in one gin-configurable place.

`DataConfig` holds what the train and eval iterators must agree on (source,
sequence length, tokenizer, split) and builds both, plus the domain names and
the corpus's byte unigram entropy used as a loss scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import numpy as np

from experiments.data import corpus, shards
from experiments.data import pipeline as data
from experiments.data.sources import load_source_split
from experiments.data.tokenizers import check_tokenizer_spec, make_tokenizer

_SEQIO_PREFIX = "seqio:"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Attributes:
      source: 'embedded', 'text:<glob>', 'jsonl:<path>', 'cluster:<dir>:<i>' (cluster i
        of scripts/cluster_corpus.py's clustering, train split; docs/cbtm.md),
        'shards:<dir>' (made by scripts/prepare_data.py; docs/data.md) or
        'seqio:<task or mixture>' (needs the `seqio` extra; see
        experiments/data/seqio_bridge.py).
      seq_len: tokens per row.
      batch_size: rows per training step (split into micro-batches by the trainer).
      eval_batch_size: rows per evaluation batch.
      tokenizer: 'byte', 'sentencepiece:<path>' or 'hf:<path to tokenizer.json>'
        (an imported model's tokenizer).
      validation_fraction: share of documents held out for validation.
      max_bytes_per_domain: size cap of the embedded corpus per domain.
      cache_dir: embedded-corpus cache (None = default).
      eval_max_batches: evaluate on at most this many batches (None = all).
      task_modules: for 'seqio:' sources, modules imported first (they
        register seqio Tasks/Mixtures).
    """

    source: str = "embedded"
    seq_len: int = 128
    batch_size: int = 16
    eval_batch_size: int = 16
    tokenizer: str = "byte"
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION
    max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN
    cache_dir: str | None = None
    eval_max_batches: int | None = None
    task_modules: tuple[str, ...] = ()

    def __post_init__(self):
        check_tokenizer_spec(self.tokenizer, "DataConfig.tokenizer")

    def _common(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "tokenizer": self.tokenizer,
                    "validation_fraction": self.validation_fraction, "cache_dir": self.cache_dir,
                    "max_bytes_per_domain": self.max_bytes_per_domain}

    def _is_seqio(self) -> bool:
        return self.source.startswith(_SEQIO_PREFIX)

    def _seqio(self, process_index: int | None = None, process_count: int | None = None):
        """The seqio source; imported only here, so the core never needs TensorFlow."""
        try:
            from experiments.data import seqio_bridge  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError(f"DataConfig.source={self.source!r} needs the optional 'seqio' "
                              f"extra: pip install -e '.[seqio]' ({e})") from e
        return seqio_bridge.SeqioData(
            seqio_bridge.provider_name(self.source), seq_len=self.seq_len,
            tokenizer=self.tokenizer, validation_fraction=self.validation_fraction,
            max_bytes_per_domain=self.max_bytes_per_domain, cache_dir=self.cache_dir,
            task_modules=self.task_modules, process_index=process_index,
            process_count=process_count)

    def train_iterator(self, seed: int, *, batch_size: int | None = None,
                       process_index: int | None = None, process_count: int | None = None):
        """Training batches; defaults: `batch_size` rows, this process's shard."""
        if self._is_seqio():
            return self._seqio(process_index, process_count).train_iterator(
                seed, self.batch_size if batch_size is None else batch_size)
        return data.make_train_iterator(
            self.source, batch_size=self.batch_size if batch_size is None else batch_size,
            seed=seed, process_index=process_index, process_count=process_count,
            **self._common())

    def eval_batches(self, *, process_index: int | None = None,
                     process_count: int | None = None) -> list[dict[str, np.ndarray]]:
        """The validation batches, materialised once.

        With `eval_max_batches`, that many batches evenly spaced over the whole
        pass: the pass is in document order, so its head would hold a single
        domain.
        """
        if self._is_seqio():
            it = self._seqio(process_index, process_count).eval_batches(self.eval_batch_size)
        else:
            it = data.make_eval_iterator(self.source, batch_size=self.eval_batch_size,
                                         process_index=process_index,
                                         process_count=process_count, **self._common())
        batches = list(it)
        if self.eval_max_batches is None or len(batches) <= self.eval_max_batches:
            return batches
        if self.eval_max_batches < 1:
            raise ValueError(f"DataConfig.eval_max_batches must be >= 1 or None, "
                             f"got {self.eval_max_batches}")
        picks = np.linspace(0, len(batches) - 1, self.eval_max_batches).round().astype(int)
        return [batches[i] for i in sorted(set(picks.tolist()))]

    def vocab_size(self) -> int:
        if self._is_seqio():
            return self._seqio().vocab_size()
        return make_tokenizer(self.tokenizer).vocab_size

    def domains(self) -> list[str]:
        if self._is_seqio():
            return self._seqio().domains()
        if (shards_dir := shards.parse_source(self.source)) is not None:
            return shards.domains(shards_dir)
        return load_source_split(self.source, "validation",
                                 validation_fraction=self.validation_fraction,
                                 cache_dir=self.cache_dir,
                                 max_bytes_per_domain=self.max_bytes_per_domain).domains

    def unigram_entropy(self, split: str = "train") -> corpus.UnigramEntropy:
        """Byte unigram entropy of the split's text (a scale for byte-level losses)."""
        if self._is_seqio():
            return self._seqio().unigram_entropy(split)
        if (shards_dir := shards.parse_source(self.source)) is not None:
            return corpus.entropy_of_counts(shards.byte_counts(shards_dir, split))
        records = load_source_split(self.source, split,
                                    validation_fraction=self.validation_fraction,
                                    cache_dir=self.cache_dir,
                                    max_bytes_per_domain=self.max_bytes_per_domain).records
        return corpus.unigram_entropy(records)
