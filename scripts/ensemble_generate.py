"""Generates text from the c-BTM sparse ensemble of branch runs.

  python scripts/ensemble_generate.py --clusters=workdirs/clusters/k4 \\
      --branch=workdirs/b0 --branch=workdirs/b1 --branch=workdirs/b2 --branch=workdirs/b3 \\
      --prompt="def main(" --max_new_tokens=32 --top_k=2 --temperature=0.1
  ... --sampling=sample --sample_temperature=0.8 --sample_top_p=0.95 --seed=1 --json

--branch j is the run trained on cluster j (as scripts/ensemble_eval.py checks; one
cluster with a run on the whole source is the single model). Each new token is drawn
from the mixture Σ_j w_j p_j of the branches' next-token distributions, the weights
(softmax of -||e - c_j||²/--temperature over the --top_k nearest centres) recomputed
at every token from the whole context so far (prompt and generated text), as c-BTM's
p(j | x_<t). --sampling=greedy (the default) takes the argmax; --sampling=sample draws
at --sample_temperature after --sample_top_k / --sample_top_p filtering, from --seed.
With one weight 1 (one cluster, or --top_k=1) the tokens are exactly that branch's
scripts/generate.py output. Stops after the first EOS id (--eos_ids; default: the
first branch's) or --max_new_tokens. Output: the new text; with --json one object
with prompt_ids, ids, stop, text and weights (per new token, the k branch weights).
Exit status 2 on bad input. See docs/cbtm.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from experiments.runtime import cli

SAMPLING = ("greedy", "sample")


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--clusters", required=True, help="Clustering directory.")
    parser.add_argument("--branch", action="append", required=True,
                        help="Branch workdir; one per cluster, in cluster order.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="Text, encoded with the first branch's tokenizer.")
    source.add_argument("--prompt_ids", help="Comma-separated token ids.")
    parser.add_argument("--max_new_tokens", type=int, required=True, help="At most (>= 1).")
    parser.add_argument("--top_k", type=int, default=1, help="Clusters kept per token, 1..k.")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="T of the ensemble weights (not of sampling).")
    parser.add_argument("--sampling", default="greedy", help=f"One of {SAMPLING}.")
    parser.add_argument("--sample_temperature", type=float, default=None,
                        help="--sampling=sample: temperature > 0 (default 1).")
    parser.add_argument("--sample_top_k", type=int, default=None, help="--sampling=sample.")
    parser.add_argument("--sample_top_p", type=float, default=None, help="--sampling=sample.")
    parser.add_argument("--seed", type=int, default=None, help="--sampling=sample (default 0).")
    parser.add_argument("--eos_ids", default=None,
                        help="Comma-separated stop ids, or 'none' (default: the branch's).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    return parser


def _sampling(args: argparse.Namespace):
    from experiments.inference import generate_cli  # pylint: disable=g-import-not-at-top
    from experiments.inference.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top
    extra = {f"--{k}": v for k, v in (("sample_temperature", args.sample_temperature),
                                      ("sample_top_k", args.sample_top_k),
                                      ("sample_top_p", args.sample_top_p), ("seed", args.seed))
             if v is not None}
    if args.sampling not in SAMPLING:
        cli.fail(f"--sampling must be one of {SAMPLING}, got {args.sampling!r}")
    if args.sampling == "greedy":
        if extra:
            cli.fail(f"{next(iter(extra))} needs --sampling=sample (greedy takes the argmax)")
        return SamplingConfig()
    temperature = 1.0 if args.sample_temperature is None else args.sample_temperature
    if not temperature > 0:
        cli.fail(f"--sample_temperature must be > 0, got {temperature}")
    try:
        return generate_cli.sampling_config(temperature, args.sample_top_k, args.sample_top_p)
    except ValueError as e:
        raise ValueError(str(e).replace("--top_", "--sample_top_")) from None


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Checks that need no model first.
    from experiments.inference import generate_cli  # pylint: disable=g-import-not-at-top
    max_new_tokens = generate_cli.check_max_new_tokens(args.max_new_tokens)
    sampling = _sampling(args)
    eos_ids = generate_cli.parse_eos_ids(args.eos_ids)
    if args.prompt is not None:
        request = generate_cli.Request(0, "--prompt", text=args.prompt)
    else:
        request = generate_cli.Request(0, "--prompt_ids", ids=tuple(
            generate_cli.parse_ids(args.prompt_ids, "--prompt_ids")))

    # pylint: disable=g-import-not-at-top
    import numpy as np

    from experiments.cbtm import ensemble
    from experiments.cbtm.clusters import load_clustering
    from experiments.cbtm.evaluate import run_source
    from experiments.cbtm.generate import EnsembleGenerator
    from experiments.inference import tokenizer as tokenizer_lib
    from experiments.inference.restore import restore_model
    # pylint: enable=g-import-not-at-top
    clustering = load_clustering(args.clusters)
    ensemble.ensemble_weights(np.zeros((1, clustering.centres.shape[1])), clustering.centres,
                              top_k=args.top_k, temperature=args.temperature)
    ensemble.check_branch_sources(clustering, [run_source(w) for w in args.branch])
    branches = [restore_model(w) for w in args.branch]
    tokenizer = functools.cache(lambda: tokenizer_lib.workdir_tokenizer(args.branch[0]))
    generator = EnsembleGenerator(branches, clustering.features.transform, clustering.centres,
                                  lambda ids: tokenizer().decode(ids), top_k=args.top_k,
                                  temperature=args.temperature)
    prompt = generate_cli.encode_requests([request], generator.vocab_size, tokenizer)[0]
    if eos_ids is None:
        eos_ids = tokenizer_lib.workdir_eos_ids(args.branch[0])
    generate_cli.check_vocab_ids(eos_ids, generator.vocab_size, "--eos_ids")
    out = generator.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                             seed=0 if args.seed is None else args.seed, eos_ids=eos_ids)
    record = generate_cli.result_records([request], [prompt], [out.ids], eos_ids,
                                         generate_cli.text_decoder(tokenizer))[0]
    record["weights"] = out.weights.round(6).tolist()
    if args.json:
        print(json.dumps(record))
    else:
        print(record.get("text", ",".join(map(str, record["ids"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
