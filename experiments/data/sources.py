"""Record sources: the embedded corpus, local text files and JSONL files.

A source is named by a string:

* ``"embedded"``: the stdlib corpus of :mod:`experiments.data.corpus`;
  ``"embedded:<domain>"`` its documents of one domain ('code' or 'prose'; the
  domain names, hence the domain ids, stay those of the whole corpus);
* ``"text:<glob>"``: one document per file matching the glob (``**``
  recurses), all under one domain;
* ``"jsonl:<path>"``: one document per non-blank line, a JSON object with a
  text field and an optional domain field;
* ``"cluster:<dir>:<i>"``: the documents of cluster ``i`` of a clustering made by
  ``scripts/cluster_corpus.py`` (:mod:`experiments.cbtm.clusters`) of one of the
  above, in the train split; its validation split is the clustered source's whole
  validation split (every branch is evaluated on the same documents), and its
  domains are those of the clustered source.

Every source yields :class:`experiments.data.corpus.Record` dicts and is split into
train/validation by hashing each record's path
(:func:`experiments.data.corpus.split_of`), so text and JSONL sources get a
validation split too.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import gin

from experiments.data import corpus
from experiments.data.corpus import Record

SOURCE_SCHEMES: tuple[str, ...] = ("embedded", "text", "jsonl", "cluster")
DEFAULT_TEXT_DOMAIN = "text"


def read_text_files(pattern: str, *, domain: str = DEFAULT_TEXT_DOMAIN) -> list[Record]:
    """One record per file matching ``pattern``, sorted by path.

    A record's path is the file path as the glob returns it, so the split is
    stable as long as the pattern is (use a relative pattern to make it
    independent of where the data lives).
    """
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"pattern matched no files: {pattern!r}")
    records = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"text file is not valid UTF-8: {f!r} ({e})") from e
        records.append(Record(text=text, domain=domain, path=f))
    return records


@gin.configurable(denylist=["pattern"])
def load_text_files(pattern: str, *, domain: str = DEFAULT_TEXT_DOMAIN) -> list[Record]:
    """The ``text:<glob>`` source: :func:`read_text_files` with ``domain`` from gin."""
    return read_text_files(pattern, domain=domain)


@gin.configurable(denylist=["path"])
def load_jsonl(
    path: str,
    *,
    text_field: str = "text",
    domain_field: str = "domain",
    default_domain: str = DEFAULT_TEXT_DOMAIN,
) -> list[Record]:
    """One record per non-blank line of the JSONL file at ``path``.

    Each line is an object with a string ``text_field`` and, optionally, a
    string ``domain_field`` (``default_domain`` when absent). A record's path is
    ``"<path>:<line number>"`` (1-based).
    """
    if not os.path.isfile(path):
        why = "a directory" if os.path.isdir(path) else "missing"
        raise ValueError(f"JSONL source {path!r} is not a file ({why})")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON at {where}: {e}") from e
            # A malformed data file is a bad value, not a caller's type error.
            if not isinstance(obj, dict):
                raise ValueError(
                    f"expected a JSON object at {where}, got {type(obj).__name__}"
                )
            text = obj.get(text_field)
            if not isinstance(text, str):
                raise ValueError(_field_error("text_field", text_field, obj, where))
            domain = obj.get(domain_field, default_domain)
            if not isinstance(domain, str):
                raise ValueError(_field_error("domain_field", domain_field, obj, where))
            records.append(Record(text=text, domain=domain, path=where))
    if not records:
        raise ValueError(f"JSONL source {path!r} has no records (the file is empty or blank)")
    return records


def _field_error(option: str, field: str, obj: dict, where: str) -> str:
    """`load_jsonl.<option>` names a missing or non-string key of the object at `where`."""
    if field not in obj:
        return (f"load_jsonl.{option} {field!r} is not a key of the JSON object at {where} "
                f"(its keys: {sorted(obj)}); bind load_jsonl.{option} to the right key")
    return (f"load_jsonl.{option} {field!r} must name a string at {where}, "
            f"got {obj[field]!r:.80}")


# The file comes from the source string; gin binds only the other options.
load_text_files.gin_set_by = {"pattern": "DataConfig.source = 'text:<glob>'"}
load_jsonl.gin_set_by = {"path": "DataConfig.source = 'jsonl:<path>'"}


def parse_source(source: str) -> tuple[str, str]:
    """Splits a source string into ``(scheme, argument)``.

    >>> parse_source("jsonl:data/train.jsonl")
    ('jsonl', 'data/train.jsonl')
    """
    scheme, sep, argument = source.partition(":")
    if scheme == "shards":
        raise ValueError(f"source {source!r} holds prepared tokens, not text: only the "
                         "training pipeline (DataConfig.source) reads it; give the text "
                         "source here ('embedded', 'text:<glob>' or 'jsonl:<path>')")
    if scheme not in SOURCE_SCHEMES:
        raise ValueError(
            f"source must be 'embedded', 'text:<glob>', 'jsonl:<path>' or "
            f"'cluster:<dir>:<i>', got {source!r}"
        )
    if scheme == "embedded" and sep and argument not in corpus.domain_names():
        raise ValueError(f"source 'embedded:<domain>' takes a domain of the embedded corpus "
                         f"{tuple(corpus.domain_names())}, got {source!r}")
    if scheme != "embedded" and not argument:
        raise ValueError(
            f"source {scheme!r} needs an argument ('{scheme}:...'), got {source!r}"
        )
    return scheme, argument


def load_source(
    source: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> list[Record]:
    """All records of ``source``; the cache arguments apply to 'embedded' only.

    Options of the file sources (``domain``, ``text_field``...) are set
    through gin on :func:`load_text_files` and :func:`load_jsonl`.
    """
    scheme, argument = parse_source(source)
    if scheme == "cluster":
        return _load_cluster(argument, cache_dir, max_bytes_per_domain)[0]
    if scheme == "embedded":
        records = corpus.load_corpus(
            cache_dir=cache_dir, max_bytes_per_domain=max_bytes_per_domain
        )
        return [r for r in records if r["domain"] == argument] if argument else records
    if scheme == "text":
        return load_text_files(argument)
    return load_jsonl(argument)


@dataclasses.dataclass(frozen=True)
class SourceSplit:
    """One split of a source and the domain vocabulary of the whole source.

    ``domains`` is the same for both splits, so a domain's id (its index) means
    the same thing in training and evaluation.
    """

    records: list[Record]
    domains: list[str]

    def domain_id(self, domain: str) -> int:
        return self.domains.index(domain)


def load_source_split(
    source: str,
    split: str,
    *,
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> SourceSplit:
    """The records of ``split`` of ``source`` with the source's domain names.

    Domains are :data:`experiments.data.corpus.DOMAINS` for 'embedded' and the
    sorted distinct domains of all records (both splits) otherwise.
    """
    scheme, argument = parse_source(source)
    if scheme == "cluster":
        records, domains = _load_cluster(argument, cache_dir, max_bytes_per_domain,
                                         validation_fraction, filtered=split == "train")
    else:
        records = load_source(
            source, cache_dir=cache_dir, max_bytes_per_domain=max_bytes_per_domain
        )
        domains = _domains(scheme, records)
    return SourceSplit(
        records=corpus.select_split(records, split, validation_fraction),
        domains=domains,
    )


def _domains(scheme: str, records: list[Record]) -> list[str]:
    if scheme == "embedded":
        return corpus.domain_names()
    return sorted({r["domain"] for r in records})


def _load_cluster(argument: str, cache_dir: str | os.PathLike[str] | None,
                  max_bytes_per_domain: int, validation_fraction: float | None = None,
                  filtered: bool = True) -> tuple[list[Record], list[str]]:
    """The records of a `cluster:<dir>:<i>` source (all of them unless `filtered`), and
    the clustered source's domains."""
    from experiments.cbtm import clusters  # pylint: disable=g-import-not-at-top

    clustering, index = clusters.open_cluster_source(argument, validation_fraction)
    records = load_source(clustering.source, cache_dir=cache_dir,
                          max_bytes_per_domain=max_bytes_per_domain)
    domains = _domains(parse_source(clustering.source)[0], records)
    if filtered:
        records = clusters.select_cluster(records, clustering, index, argument)
    return records, domains
