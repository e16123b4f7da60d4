"""lm-evaluation-harness adapter: our checkpoints as the lm-eval model `sparse_moe`.

  python scripts/lm_eval.py --model sparse_moe --model_args workdir=W --tasks ...
  lm_eval.simple_evaluate(model=SparseMoeLM(workdir=W), tasks=[...])

Importing this module registers `SparseMoeLM` under the name `sparse_moe`
(lm-eval's own CLI has no plugin entry point for models: scripts/lm_eval.py
imports this module, then runs that CLI). It needs the `lm_eval` package (the
`.venv-interop` of `make test-interop`; not a core dependency).

Text goes through the workdir's tokenizer (`workdir_tokenizer`: the model's own
tokenizer.json / tokenizer.model, else the run's data tokenizer).
`loglikelihood` and `loglikelihood_rolling` score in padded batches
(`score.score_batch`, one compile per length bucket); `generate_until` runs the
KV-cache engine (`generate.load_generator`) and cuts each generation at its
first `until` string. Model args: workdir, step (default: the latest intact
checkpoint), batch_size (rows per forward / generate call, default 8),
max_length (tokens of context per forward; default: the imported config's
`max_position_embeddings`, else the run's `DataConfig.seq_len`), max_gen_toks
(default of the generation requests that name none, 256).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from experiments.data.config import DataConfig
from experiments.inference import score as score_lib
from experiments.inference.tokenizer import workdir_eos_ids, workdir_tokenizer

_log = logging.getLogger(__name__)
# Generation keyword arguments of lm-eval tasks that we honour; others are refused.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise ValueError(f"sparse_moe model arg {name} must be an integer >= 1, got {value!r}")
    return number


def _default_max_length(workdir: Path) -> int:
    """The imported config's max_position_embeddings, else the run's DataConfig.seq_len."""
    try:
        config = json.loads((workdir / "hf_import.json").read_text(encoding="utf-8"))["config"]
        return int(config["max_position_embeddings"])
    except (OSError, KeyError, TypeError, ValueError):
        return DataConfig().seq_len  # the run's config.gin is parsed by load_scorer


@register_model("sparse_moe")
class SparseMoeLM(TemplateLM):
    """A workdir of ours (trained, upcycled or imported) as an lm-eval LM."""

    def __init__(self, workdir: str, step: int | str | None = None, batch_size: Any = 8,
                 max_length: Any = None, max_gen_toks: Any = 256, device: str | None = None,
                 max_batch_size: Any = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise ValueError(f"sparse_moe model args {sorted(unknown)} are not supported: "
                             "allowed workdir, step, batch_size, max_length, max_gen_toks")
        if device not in (None, "cpu", "cuda", "gpu", "tpu") and not str(device).startswith(
                "cuda:"):
            raise ValueError(f"--device {device!r}: JAX places the model (JAX_PLATFORMS); "
                             "leave --device unset")
        del max_batch_size  # only meaningful with batch_size=auto, which is refused
        self.workdir = Path(workdir)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        step_value = None if step in (None, "", "None") else _positive_or_zero(step)
        self.scorer = score_lib.load_scorer(self.workdir, step_value)
        self.step = self.scorer.step
        self.tokenizer = workdir_tokenizer(self.workdir)
        self.max_length = (_default_max_length(self.workdir) if max_length in (None, "")
                           else _positive_int("max_length", max_length))
        self.eos_ids = workdir_eos_ids(self.workdir, self.tokenizer)
        self._generator = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict | None = None) -> SparseMoeLM:
        """`--model_args` win over the CLI's `--batch_size`/`--device` defaults."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in args}
        return cls(**args, **extra)

    # --- tokenization -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        for token in (self.tokenizer.eos_id, self.tokenizer.bos_id):
            if token >= 0:
                return int(token)
        raise ValueError(f"{self.tokenizer!r} has neither an EOS nor a BOS id: an empty "
                         "context has no token to condition on")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        del add_special_tokens, kwargs  # the tokenizer's own setting decides
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    @property
    def tokenizer_name(self) -> str:
        return repr(self.tokenizer)

    # --- scoring ----------------------------------------------------------------------
    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The scored sequence: at most max_length inputs (+ the last target), context cut
        from the left."""
        return (context + continuation)[-(self.max_length + 1):]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        del disable_tqdm, kwargs
        sequences = [self._window(ctx, cont) for _, ctx, cont in requests]
        scored = score_lib.score_batch(self.scorer, sequences, batch_size=self.batch_size)
        answers = []
        for (key, _, cont), result in zip(requests, scored):
            n = min(len(cont), result.logprobs.size)
            answer = ((float(result.logprobs[-n:].sum()), bool(result.greedy[-n:].all()))
                      if n else (0.0, True))
            answers.append(answer)
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Each text's log-likelihood after `eot_token_id`, in disjoint rolling windows of
        max_length tokens (lm-eval's `get_rolling_token_windows`, context_len 1)."""
        del disable_tqdm
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, predicted in map(lm_utils.make_disjoint_window,
                                          lm_utils.get_rolling_token_windows(
                                              token_list=self.tok_encode(text),
                                              prefix_token=self.eot_token_id,
                                              max_seq_len=self.max_length, context_len=1)):
                windows.append((context, predicted))
                owners.append(index)
        scored = score_lib.score_batch(self.scorer, [c + p for c, p in windows],
                                       batch_size=self.batch_size)
        totals = [0.0] * len(requests)
        for owner, (_, predicted), result in zip(owners, windows, scored):
            totals[owner] += float(result.logprobs[-len(predicted):].sum())
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # --- generation -------------------------------------------------------------------
    def _sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`generate`'s keyword for the request: none (greedy) unless do_sample with a
        temperature > 0 (`SamplingConfig` validates)."""
        if not kwargs.get("do_sample", False) or float(kwargs.get("temperature", 0.0)) == 0.0:
            return {}
        from experiments.inference.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
        return {"sampling": SamplingConfig(temperature=float(kwargs["temperature"]),
                                           top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"))}

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generates up to max_gen_toks tokens per request (stopping at an EOS id), decodes
        them and cuts the text at the first of the request's `until` strings. Requests
        with equal generation arguments share batches of batch_size prompts."""
        del disable_tqdm
        if self._generator is None:
            from experiments.inference.generate import load_generator  # pylint: disable=g-import-not-at-top
            self._generator = load_generator(self.workdir, self.step)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str),
                              []).append(index)
        outputs = [""] * len(requests)
        for key, indices in groups.items():
            kwargs = dict(json.loads(key))
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown:
                raise ValueError(f"generation arguments {unknown} are not supported by "
                                 f"sparse_moe: allowed {', '.join(GEN_KWARGS)}")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _positive_int("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks))
            sampling = self._sampling(kwargs)
            keep = max(1, self.max_length - max_new)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:]
                           for i in chunk]
                new_tokens = self._generator.generate(prompts, max_new_tokens=max_new,
                                                      eos_ids=self.eos_ids, **sampling)
                for i, tokens in zip(chunk, new_tokens):
                    outputs[i] = cut_at_stop(self.tok_decode(tokens), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs


def _positive_or_zero(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0:
        raise ValueError(f"sparse_moe model arg step must be an integer >= 0, got {value!r}")
    return number


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any non-empty `until` string."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if 0 <= found < cut:
                cut = found
    return text[:cut]
