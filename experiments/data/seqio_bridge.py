"""seqio as a data source of the trainer: ``DataConfig.source = 'seqio:<name>'``.

``<name>`` is a registered seqio Task or Mixture. `sparse_moe_embedded` (the
embedded corpus, :mod:`experiments.data.seqio_tasks`) is registered on demand with
the DataConfig's tokenizer, validation fraction and corpus cap, so it sees the
same documents as the grain default; other names come from the modules in
``DataConfig.task_modules``, imported first (t5x's ``MIXTURE_OR_TASK_MODULE``).

Batches have the grain pipeline's keys and shapes (see
:mod:`experiments.data.pipeline`), built by :class:`LMDomainFeatureConverter`, seqio's
decoder-only LM packing converter plus the per-token domain id:

* ``targets``: the packed chunks' tokens; ``inputs``: the same shifted right
  by one within each segment, ``0`` at a segment start (seqio's convention,
  so every token of a chunk is a target, the first one predicted from 0);
* ``weights`` ``1`` on real tokens; ``segment_ids``, ``positions`` from the
  packing; ``domain`` the Task's domain id, ``-1`` on padding.

Sharding: each Task's split is sharded by process (``seqio.ShardInfo(
process_index, process_count)``), ``batch_size`` rows per process. Resume:
the iterator counts the batches it handed out (``get_state``); a new iterator
given that state (``set_state``) rebuilds the same deterministic pipeline and
skips that many batches, since tf.data iterators cannot be saved as JSON.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import seqio
import tensorflow as tf

from experiments.data import corpus, seqio_tasks
from experiments.data.seqio_tasks import DOMAIN, TARGETS

SCHEME = "seqio"
DOMAIN_PAD_ID = -1
Batch = dict[str, np.ndarray]


def is_seqio_source(source: str) -> bool:
    return isinstance(source, str) and source.startswith(SCHEME + ":")


def provider_name(source: str) -> str:
    """``'seqio:<name>'`` -> ``'<name>'``."""
    name = source.partition(":")[2] if is_seqio_source(source) else ""
    if not name:
        raise ValueError(f"source must be 'seqio:<task or mixture name>', got {source!r}")
    return name


class LMDomainFeatureConverter(seqio.LMFeatureConverter):
    """seqio's decoder-only LM converter carrying a per-token ``domain`` feature.

    Task features ``targets`` and ``domain`` (``[n] int32`` each, same n);
    model features those of `seqio.LMFeatureConverter` plus
    ``decoder_domain`` (``-1`` on padding, ``DOMAIN_PAD_ID``).
    """

    TASK_FEATURES: ClassVar = {
        TARGETS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        DOMAIN: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES: ClassVar = {
        **seqio.LMFeatureConverter.MODEL_FEATURES,
        "decoder_domain": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # seqio's packing takes a feature's length to be its count of non-zero
        # values, so domain 0 would vanish: shift ids by one while packing.
        ds = ds.map(lambda ex: dict(ex, **{DOMAIN: ex[DOMAIN] + 1}),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return super()._convert_features(ds, task_feature_lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = dict(super()._convert_example(features))
        out["decoder_domain"] = features[DOMAIN] - 1  # padding (0) becomes -1
        return out

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["decoder_domain"] = task_feature_lengths[TARGETS]
        return lengths


def _to_batch(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {
        "inputs": features["decoder_input_tokens"],
        "targets": features["decoder_target_tokens"],
        "weights": tf.cast(features["decoder_loss_weights"], tf.float32),
        "segment_ids": features["decoder_segment_ids"],
        "positions": features["decoder_positions"],
        "domain": features["decoder_domain"],
    }


def _task_features(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Keeps ``targets`` and ``domain`` (domain 0 for Tasks that have none)."""
    has_domain = DOMAIN in ds.element_spec

    def select(ex):
        domain = ex[DOMAIN] if has_domain else tf.zeros_like(ex[TARGETS])
        return {TARGETS: tf.cast(ex[TARGETS], tf.int32), DOMAIN: tf.cast(domain, tf.int32)}

    return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)


class SeqioBatchIterator:
    """Endless packed batches from a deterministic tf.data pipeline, resumable.

    ``make_dataset(skip)`` must build the same pipeline every time and skip
    its first ``skip`` batches. State: ``{'batches_consumed', 'batch_size'}``
    (rows consumed = their product); used by
    :func:`experiments.data.pipeline.iterator_state` / ``restore_iterator_state``.
    """

    def __init__(self, make_dataset, batch_size: int):
        self._make_dataset = make_dataset
        self._batch_size = batch_size
        self._consumed = 0
        self._iterator: Iterator[Batch] | None = None

    def __iter__(self) -> SeqioBatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._make_dataset(self._consumed).as_numpy_iterator()
        batch = next(self._iterator)
        self._consumed += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"batches_consumed": self._consumed, "batch_size": self._batch_size}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("batch_size") != self._batch_size or "batches_consumed" not in state:
            raise ValueError(f"iterator state {dict(state)} does not belong to a seqio iterator "
                             f"with batch_size={self._batch_size}")
        consumed = int(state["batches_consumed"])
        if consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {consumed}")
        self._consumed = consumed
        self._iterator = None


def _pad_rows(batch: Batch, batch_size: int, pad_id: int) -> Batch:
    missing = batch_size - batch["inputs"].shape[0]
    if missing == 0:
        return batch
    fill = {"inputs": pad_id, "targets": pad_id, "domain": DOMAIN_PAD_ID}
    return {k: np.concatenate([v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)])
            for k, v in batch.items()}


def import_task_modules(modules: Sequence[str]) -> None:
    """Imports the modules that register seqio Tasks/Mixtures."""
    for module in modules:
        importlib.import_module(module)


class SeqioData:
    """Train/eval batches, domains and vocabulary of one seqio Task or Mixture.

    Args:
      name: the Task or Mixture.
      seq_len: tokens per row S.
      tokenizer: vocabulary of the built-in embedded mixture ('byte' or
        'sentencepiece:<path>'); other providers bring their own.
      validation_fraction, max_bytes_per_domain, cache_dir: the built-in
        embedded mixture's split and corpus (as in the grain pipeline).
      task_modules: modules imported first; they register other providers.
      process_index, process_count: this process's shard (default from jax).
    """

    def __init__(self, name: str, *, seq_len: int, tokenizer: str = "byte",
                 validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
                 max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
                 cache_dir: str | None = None, task_modules: Sequence[str] = (),
                 process_index: int | None = None, process_count: int | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        import_task_modules(task_modules)
        if name == seqio_tasks.EMBEDDED_MIXTURE:
            seqio_tasks.register_embedded_mixture(
                name, vocabulary=tokenizer, validation_fraction=validation_fraction,
                max_bytes_per_domain=max_bytes_per_domain, cache_dir=cache_dir, overwrite=True)
        try:
            self.provider = seqio.get_mixture_or_task(name)
        except ValueError as e:
            raise ValueError(f"no seqio Task or Mixture named {name!r}; register it in a module "
                             f"listed in DataConfig.task_modules ({e})") from e
        if TARGETS not in self.provider.output_features:
            raise ValueError(f"seqio provider {name!r} has no {TARGETS!r} output feature")
        self.name = name
        self.seq_len = seq_len
        if process_index is None or process_count is None:
            import jax  # pylint: disable=g-import-not-at-top

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, process_count={process_count}), "
                             f"got {process_index}")
        self.shard_info = seqio.ShardInfo(index=process_index, num_shards=process_count)

    @property
    def vocabulary(self) -> seqio.Vocabulary:
        return self.provider.output_features[TARGETS].vocabulary

    def vocab_size(self) -> int:
        return int(self.vocabulary.vocab_size)

    def domains(self) -> list[str]:
        """Domain names; a batch's ``domain`` ids index this list."""
        if DOMAIN in self.provider.output_features:
            return seqio_tasks.domain_names(self.name)
        return [self.name]

    @property
    def _lengths(self) -> dict[str, int]:
        return {TARGETS: self.seq_len, DOMAIN: self.seq_len}

    def _convert(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        converter = LMDomainFeatureConverter(pack=True)
        return converter(_task_features(ds), self._lengths)

    def _train_dataset(self, seed: int, batch_size: int, skip: int) -> tf.data.Dataset:
        ds = self.provider.get_dataset(self._lengths, split="train", shuffle=True, seed=seed,
                                       shard_info=self.shard_info, num_epochs=None)
        ds = self._convert(ds).batch(batch_size, drop_remainder=True).map(_to_batch)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).skip(skip).prefetch(2)

    def train_iterator(self, seed: int, batch_size: int) -> SeqioBatchIterator:
        """Endless shuffled batches of ``batch_size`` rows; resumable (see module doc)."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return SeqioBatchIterator(
            functools.partial(self._train_dataset, int(seed), batch_size), batch_size)

    def _tasks(self) -> list[seqio.Task]:
        return list(getattr(self.provider, "tasks", [self.provider]))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """One pass over the validation split of every Task, in Task order.

        No shuffling; the last batch is padded with empty rows to ``batch_size``.
        """
        datasets = [task.get_dataset(self._lengths, split="validation", shuffle=False,
                                     num_epochs=1, shard_info=self.shard_info)
                    for task in self._tasks() if "validation" in task.splits]
        if not datasets:
            raise ValueError(f"seqio provider {self.name!r} has no 'validation' split")
        datasets = [_task_features(ds) for ds in datasets]
        ds = functools.reduce(lambda a, b: a.concatenate(b), datasets)
        ds = self._convert(ds).batch(batch_size, drop_remainder=False).map(_to_batch)
        pad_id = int(self.vocabulary.pad_id)
        for batch in ds.as_numpy_iterator():
            yield _pad_rows(batch, batch_size, pad_id)

    def unigram_entropy(self, split: str = "train") -> corpus.UnigramEntropy:
        """Byte unigram entropy of the raw text (providers of `seqio_tasks` only)."""
        texts = seqio_tasks.raw_texts(self.name, split)
        return corpus.unigram_entropy({"text": t} for t in texts)
