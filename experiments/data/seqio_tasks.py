"""seqio Tasks and Mixtures over the project's local data (the `seqio` extra).

Importing this module imports seqio and TensorFlow; nothing in `moe/`,
`layers/` or the grain pipeline imports it. Registration functions:

* :func:`register_embedded_mixture`: one Task per domain of the embedded
  stdlib corpus (`<name>_code`, `<name>_prose`) and the Mixture `<name>`;
* :func:`register_text_files_mixture`: one Task per domain from local text
  files (one document per file, split by path hash like the grain sources);
* :func:`register_tsv_mixture`: one Task per domain from local TSV files (one
  document per row, a file pattern per split).

Every Task emits, per example (one chunk of one document):

* ``targets`` ``[n] int32``: token ids, ``n <= sequence_length['targets']``;
  the document's last chunk ends with EOS;
* ``domain``  ``[n] int32``: the Task's domain id, repeated per token (the
  index of its domain in the Mixture's sorted domain list,
  :func:`domain_names`).

Documents are tokenized whole, EOS is appended, and the token sequence is cut
into consecutive chunks of ``sequence_length['targets']`` tokens (the last one
shorter), so nothing is truncated away. The vocabulary is :class:`ByteVocabulary`
(ids identical to :class:`experiments.data.tokenizers.ByteTokenizer`) or a local
SentencePiece model (``scripts/train_tokenizer.py``), named like the
tokenizers: ``'byte'`` or ``'sentencepiece:<path>'``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

try:
    import seqio
    import tensorflow as tf
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("seqio data sources need the optional 'seqio' extra (seqio, TensorFlow): "
                      "pip install -e '.[seqio]'") from e

from experiments.data import corpus
from experiments.data.corpus import Record
from experiments.data.sources import read_text_files
from experiments.data.tokenizers import TOKENIZER_SPECS, ByteTokenizer

SEQIO_TOKENIZER_SPECS = TOKENIZER_SPECS[:2]  # 'byte', 'sentencepiece:<model path>'

# tf.data runs on the host; TensorFlow must not take the accelerators JAX uses.
try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised, or no such device type
    pass

TARGETS = "targets"
DOMAIN = "domain"
EMBEDDED_MIXTURE = "sparse_moe_embedded"
SPLITS = ("train", "validation")


class ByteVocabulary(seqio.ByteVocabulary):
    """seqio's byte vocabulary with :class:`ByteTokenizer`'s special ids.

    ``0`` pad, ``1`` BOS, ``2`` EOS, ``3 + b`` for byte ``b`` (vocab 259).
    seqio's own `ByteVocabulary` uses ``1`` for EOS and ``2`` for UNK; here
    every byte has an id, so there is no UNK.
    """

    @property
    def bos_id(self) -> int:
        return ByteTokenizer.BOS_ID

    @property
    def eos_id(self) -> int:
        return ByteTokenizer.EOS_ID

    @property
    def unk_id(self) -> None:
        return None


def make_vocabulary(spec: str | seqio.Vocabulary = "byte") -> seqio.Vocabulary:
    """``'byte'`` -> :class:`ByteVocabulary`; ``'sentencepiece:<path>'`` ->
    ``seqio.SentencePieceVocabulary``; a Vocabulary is returned unchanged."""
    if isinstance(spec, seqio.Vocabulary):
        return spec
    if spec == "byte":
        return ByteVocabulary()
    kind, _, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "sentencepiece" and path:
        if not os.path.isfile(path):
            raise ValueError(f"vocabulary model path is not a file: {path!r}")
        return seqio.SentencePieceVocabulary(path)
    raise ValueError(f"vocabulary must be one of {SEQIO_TOKENIZER_SPECS} or a seqio.Vocabulary "
                     f"(a seqio source has no 'hf:' tokenizer), got {spec!r}")


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """``targets`` (tokens, EOS appended) and the per-token ``domain`` id."""
    return {
        TARGETS: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
        DOMAIN: seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                              dtype=tf.int32, required=False),
    }


# --- Preprocessors -----------------------------------------------------------

def split_into_chunks(dataset: tf.data.Dataset,
                      sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    """Cuts each example's ``targets`` into chunks of ``sequence_length['targets']``.

    A document of n tokens becomes ceil(n / L) examples: L tokens each, the
    last one the remainder. Without a sequence length the data pass unchanged.
    """
    if not sequence_length or sequence_length.get(TARGETS) is None:
        return dataset
    length = int(sequence_length[TARGETS])

    def chunks(example):
        tokens = example[TARGETS]
        n = tf.size(tokens)
        remainder = n % length
        row_lengths = tf.concat([tf.fill([n // length], length),
                                 tf.reshape(remainder, [1])[: tf.minimum(remainder, 1)]], 0)
        return tf.data.Dataset.from_tensor_slices(
            {TARGETS: tf.RaggedTensor.from_row_lengths(tokens, row_lengths)})

    return dataset.flat_map(chunks)


@seqio.map_over_dataset
def add_domain(example: Mapping[str, tf.Tensor], domain_id: int) -> dict[str, tf.Tensor]:
    """Adds ``domain`` = ``domain_id`` for every token of ``targets``."""
    return dict(example, **{DOMAIN: tf.fill(tf.shape(example[TARGETS]), domain_id)})


def parse_tsv(dataset: tf.data.Dataset, field_names: Sequence[str],
              text_field: str) -> tf.data.Dataset:
    """Lines of tab-separated fields -> ``{'text': <text_field's column>}``."""
    column = list(field_names).index(text_field)

    def parse(line):
        fields = tf.io.decode_csv(line, record_defaults=[""] * len(field_names),
                                  field_delim="\t", use_quote_delim=False)
        return {"text": fields[column]}

    return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def _text_preprocessors(domain_id: int) -> list[Callable[..., tf.data.Dataset]]:
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={TARGETS: "text"}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.preprocessors.append_eos,
        split_into_chunks,
        functools.partial(add_domain, domain_id=domain_id),
    ]


# --- Registration ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Registered:
    """What this module registered under a name: its domains and raw texts."""

    domains: tuple[str, ...]
    config: tuple
    texts: Mapping[str, Callable[[str], Iterable[str]]]  # task name -> split -> texts


_REGISTERED: dict[str, _Registered] = {}


def domain_names(name: str) -> list[str]:
    """The domain list of a Task or Mixture registered here; ids index it."""
    if name not in _REGISTERED:
        raise ValueError(f"{name!r} was not registered by experiments.data.seqio_tasks; "
                         f"registered: {sorted(_REGISTERED)}")
    return list(_REGISTERED[name].domains)


def raw_texts(name: str, split: str) -> Iterable[str]:
    """The untokenized documents of ``split`` of a Task or Mixture registered here."""
    if name not in _REGISTERED:
        raise ValueError(f"{name!r} was not registered by experiments.data.seqio_tasks")
    for texts in _REGISTERED[name].texts.values():
        yield from texts(split)


def _remove(name: str) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)
    _REGISTERED.pop(name, None)


def _check_new_name(name: str, config: tuple, overwrite: bool) -> bool:
    """True when `name` already holds exactly this registration (nothing to do)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    existing = _REGISTERED.get(name)
    if existing is not None and existing.config == config:
        return True
    if name in seqio.MixtureRegistry.names() or name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f"a seqio Task or Mixture named {name!r} is already registered "
                             "with other settings; pass overwrite=True or use another name")
        _remove(name)
    return False


def _register_domains(name: str, config: tuple, vocabulary: seqio.Vocabulary,
                      sources: Mapping[str, seqio.DataSource],
                      preprocessors: Mapping[str, list],
                      texts: Mapping[str, Callable[[str], Iterable[str]]],
                      rates: Mapping[str, float] | None, overwrite: bool) -> seqio.Mixture:
    domains = tuple(sorted(sources))
    if rates is not None and set(rates) != set(domains):
        raise ValueError(f"rates must name exactly the domains {list(domains)}, "
                         f"got {sorted(rates)}")
    features = output_features(vocabulary)
    task_rates = []
    task_texts = {}
    for domain in domains:
        task_name = f"{name}_{domain}"
        if task_name in seqio.TaskRegistry.names():
            if not overwrite and task_name not in _REGISTERED:
                raise ValueError(f"a seqio Task named {task_name!r} is already registered")
            _remove(task_name)
        seqio.TaskRegistry.add(task_name, source=sources[domain], output_features=features,
                               preprocessors=preprocessors[domain], metric_fns=[])
        task_texts[task_name] = texts[domain]
        _REGISTERED[task_name] = _Registered(domains, config, {task_name: texts[domain]})
        # Default rate: the domain's share of training text, which is how often
        # the grain pipeline (uniform over chunks) draws it.
        rate = (rates[domain] if rates is not None
                else functools.partial(_training_bytes, texts[domain]))
        task_rates.append((task_name, rate))
    mixture = seqio.MixtureRegistry.add(name, task_rates)
    _REGISTERED[name] = _Registered(domains, config, task_texts)
    return mixture


@functools.cache
def _training_bytes_cached(texts: Callable[[str], Iterable[str]]) -> float:
    return float(sum(len(t.encode("utf-8")) for t in texts("train")))


def _training_bytes(texts: Callable[[str], Iterable[str]], task: seqio.Task) -> float:
    del task
    return max(_training_bytes_cached(texts), 1.0)


def _records_texts(load: Callable[[], list[Record]], validation_fraction: float):
    def texts(split: str) -> list[str]:
        return [r["text"] for r in corpus.select_split(load(), split, validation_fraction)]
    return texts


def _records_source(texts: Callable[[str], list[str]]) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        docs = texts(split)
        ds = tf.data.Dataset.from_tensor_slices({"text": tf.constant(docs, tf.string,
                                                                     shape=[len(docs)])})
        if shuffle_files and docs:
            ds = ds.shuffle(len(docs), seed=seed, reshuffle_each_iteration=True)
        return ds

    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


def register_embedded_mixture(name: str = EMBEDDED_MIXTURE, *, vocabulary: str = "byte",
                              validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
                              max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
                              cache_dir: str | None = None,
                              rates: Mapping[str, float] | None = None,
                              overwrite: bool = False) -> seqio.Mixture:
    """Tasks `<name>_code`, `<name>_prose` and Mixture `<name>` over the embedded corpus.

    Splits are those of the grain pipeline (:func:`experiments.data.corpus.split_of`
    with ``validation_fraction``). ``rates`` maps domain -> mixing rate;
    default: each domain's bytes of training text. Registering the same name
    again with the same arguments is a no-op; with other arguments it needs
    ``overwrite=True``.
    """
    config = ("embedded", str(vocabulary), validation_fraction, max_bytes_per_domain,
              cache_dir, tuple(sorted((rates or {}).items())))
    if _check_new_name(name, config, overwrite):
        return seqio.get_mixture_or_task(name)
    vocab = make_vocabulary(vocabulary)
    corpus._check_fraction(validation_fraction)  # pylint: disable=protected-access

    @functools.lru_cache(maxsize=1)
    def load() -> list[Record]:
        return corpus.load_corpus(cache_dir=cache_dir, max_bytes_per_domain=max_bytes_per_domain)

    sources, preprocessors, texts = {}, {}, {}
    domains = corpus.domain_names()
    for domain_id, domain in enumerate(domains):
        def load_domain(domain=domain) -> list[Record]:
            return [r for r in load() if r["domain"] == domain]
        texts[domain] = _records_texts(load_domain, validation_fraction)
        sources[domain] = _records_source(texts[domain])
        preprocessors[domain] = _text_preprocessors(domain_id)
    return _register_domains(name, config, vocab, sources, preprocessors, texts, rates,
                             overwrite)


def register_text_files_mixture(name: str, patterns: Mapping[str, str], *,
                                vocabulary: str = "byte",
                                validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
                                rates: Mapping[str, float] | None = None,
                                overwrite: bool = False) -> seqio.Mixture:
    """One Task per domain from local text files, and the Mixture `name`.

    ``patterns`` maps domain -> glob (``**`` recurses); each file is one
    document, split into train/validation by hashing its path as the grain
    ``text:`` source does. Task names are ``<name>_<domain>``.
    """
    if not patterns:
        raise ValueError("patterns must map at least one domain to a glob")
    config = ("text", str(vocabulary), validation_fraction, tuple(sorted(patterns.items())),
              tuple(sorted((rates or {}).items())))
    if _check_new_name(name, config, overwrite):
        return seqio.get_mixture_or_task(name)
    vocab = make_vocabulary(vocabulary)
    corpus._check_fraction(validation_fraction)  # pylint: disable=protected-access
    sources, preprocessors, texts = {}, {}, {}
    for domain_id, domain in enumerate(sorted(patterns)):
        records = read_text_files(patterns[domain], domain=domain)  # fails early on no match
        texts[domain] = _records_texts(lambda records=records: records, validation_fraction)
        sources[domain] = _records_source(texts[domain])
        preprocessors[domain] = _text_preprocessors(domain_id)
    return _register_domains(name, config, vocab, sources, preprocessors, texts, rates,
                             overwrite)


def _tsv_texts(split_patterns: Mapping[str, str], column: int, skip_header_lines: int):
    def texts(split: str) -> list[str]:
        if split not in split_patterns:
            return []
        out = []
        for path in sorted(glob.glob(split_patterns[split], recursive=True)):
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            out.extend(line.split("\t")[column] for line in lines[skip_header_lines:])
        return out
    return texts


def register_tsv_mixture(name: str, files: Mapping[str, Mapping[str, str]], *,
                         field_names: Sequence[str], text_field: str = "text",
                         vocabulary: str = "byte", skip_header_lines: int = 0,
                         rates: Mapping[str, float] | None = None,
                         overwrite: bool = False) -> seqio.Mixture:
    """One Task per domain from local TSV files, and the Mixture `name`.

    ``files`` maps domain -> {split: glob} (splits 'train' and/or
    'validation'); every line is one document whose text is the column named
    ``text_field`` of ``field_names``. No quoting: fields hold no tabs or
    newlines. Task names are ``<name>_<domain>``.
    """
    if not files:
        raise ValueError("files must map at least one domain to {split: glob}")
    if text_field not in field_names:
        raise ValueError(f"text_field {text_field!r} is not in field_names {list(field_names)}")
    for domain, split_patterns in files.items():
        unknown = set(split_patterns) - set(SPLITS)
        if unknown or not split_patterns:
            raise ValueError(f"files[{domain!r}] must map splits {SPLITS} to globs, "
                             f"got {dict(split_patterns)}")
        for split, pattern in split_patterns.items():
            if not glob.glob(pattern, recursive=True):
                raise ValueError(f"pattern matched no files: {pattern!r} "
                                 f"(domain {domain!r}, split {split!r})")
    config = ("tsv", str(vocabulary), tuple(field_names), text_field, skip_header_lines,
              tuple(sorted((d, tuple(sorted(s.items()))) for d, s in files.items())),
              tuple(sorted((rates or {}).items())))
    if _check_new_name(name, config, overwrite):
        return seqio.get_mixture_or_task(name)
    vocab = make_vocabulary(vocabulary)
    column = list(field_names).index(text_field)
    sources, preprocessors, texts = {}, {}, {}
    for domain_id, domain in enumerate(sorted(files)):
        sources[domain] = seqio.TextLineDataSource(dict(files[domain]),
                                                   skip_header_lines=skip_header_lines)
        texts[domain] = _tsv_texts(files[domain], column, skip_header_lines)
        preprocessors[domain] = [
            functools.partial(parse_tsv, field_names=tuple(field_names), text_field=text_field),
            *_text_preprocessors(domain_id)]
    return _register_domains(name, config, vocab, sources, preprocessors, texts, rates,
                             overwrite)
