"""Generates text from a workdir's model with a KV cache (prefill, then one token a step).

  python scripts/generate.py --workdir=workdirs/default --prompt="The quick" --max_new_tokens=32
  python scripts/generate.py --workdir=W --prompt_ids=1,72,101 --max_new_tokens=8 --json
  python scripts/generate.py --workdir=W --batch_file=prompts.jsonl --max_new_tokens=16 \\
      --temperature=0.8 --top_p=0.95 --seed=1 --json

Restores the latest intact checkpoint read-only (or --step), MoE layers
dropless with the loss-free selection biases applied, as scripts/score.py
does. --temperature=0 (the default) is greedy; otherwise tokens are sampled
at that temperature, after --top_k / --top_p filtering, from --seed. A
sequence stops after its first EOS token (--eos_ids; default: the workdir's
generation_config.json / hf_import.json `eos_token_id`, else the tokenizer's
EOS; --eos_ids=none never stops early) or after --max_new_tokens.

--prompt is encoded with the workdir's tokenizer (a tokenizer file stored in
the workdir, else the run's DataConfig.tokenizer). --batch_file is JSONL, one
prompt a line, `{"prompt": "text"}` or `{"prompt_ids": [1, 2, 3]}`; all
prompts run as one ragged batch. Output: the new text (or ids) per prompt;
with --json one object per prompt and line, in input order: `prompt` (its
index), `prompt_ids`, `ids` (the new tokens only), `stop` ('eos' or
'length'), `text` (where the tokenizer can decode them). Exit status 2 on bad
input: a workdir without checkpoint, --max_new_tokens < 1, a temperature < 0,
--top_k < 1, --top_p outside (0, 1], ids outside the vocabulary, a bad batch file,
--speculative with sampling or on a model without multi-token prediction.

--speculative: greedy self-speculative decoding drafted by the run's multi-token
prediction head (experiments/inference/speculative.py); the output is greedy's, the
acceptance rate is printed to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from experiments.inference import generate_cli
from experiments.inference import tokenizer as tokenizer_lib
from experiments.runtime import cli


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--workdir", required=True, help="A training or imported workdir.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="Text, encoded with the workdir's tokenizer.")
    source.add_argument("--prompt_ids", help="Comma-separated token ids, e.g. 1,72,101.")
    source.add_argument("--batch_file", help="JSONL: one {\"prompt\": ...} or "
                        "{\"prompt_ids\": [...]} a line.")
    parser.add_argument("--max_new_tokens", type=int, required=True,
                        help="New tokens per prompt at most (>= 1).")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); > 0 samples.")
    parser.add_argument("--top_k", type=int, default=None, help="Sample among the k most likely.")
    parser.add_argument("--top_p", type=float, default=None,
                        help="Nucleus sampling mass, in (0, 1].")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--eos_ids", default=None,
                        help="Comma-separated stop ids, or 'none' (default: the workdir's).")
    parser.add_argument("--step", type=int, default=None,
                        help="Checkpoint step (default: the latest intact one).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
    parser.add_argument("--speculative", action="store_true",
                        help="Greedy self-speculative decoding with the run's multi-token "
                             "prediction head (same output as greedy; prints the acceptance "
                             "rate to stderr). Needs --temperature 0 and a model with MTP.")
    return parser


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Checks that need no model first.
    max_new_tokens = generate_cli.check_max_new_tokens(args.max_new_tokens)
    sampling = generate_cli.sampling_config(args.temperature, args.top_k, args.top_p)
    if args.speculative and (args.temperature != 0 or args.top_k is not None
                             or args.top_p is not None):
        cli.fail("--speculative decodes greedily: it needs --temperature 0 and no --top_k "
                 "or --top_p")
    eos_ids = generate_cli.parse_eos_ids(args.eos_ids)
    if args.batch_file is not None:
        requests = generate_cli.read_batch_file(args.batch_file)
    elif args.prompt is not None:
        requests = [generate_cli.Request(0, "--prompt", text=args.prompt)]
    else:
        ids = generate_cli.parse_ids(args.prompt_ids, "--prompt_ids")
        requests = [generate_cli.Request(0, "--prompt_ids", ids=tuple(ids))]

    from experiments.inference import generate  # pylint: disable=g-import-not-at-top
    if args.speculative:
        from experiments.inference import restore, speculative  # pylint: disable=g-import-not-at-top
        generator = speculative.SpeculativeGenerator(restore.restore_model(args.workdir,
                                                                           args.step))
    else:
        generator = generate.load_generator(args.workdir, args.step)
    vocab_size = generator.vocab_size
    tokenizer = functools.cache(lambda: tokenizer_lib.workdir_tokenizer(args.workdir))
    prompts = generate_cli.encode_requests(requests, vocab_size, tokenizer)
    if eos_ids is None:
        eos_ids = tokenizer_lib.workdir_eos_ids(args.workdir)
    generate_cli.check_vocab_ids(eos_ids, vocab_size, "--eos_ids")
    outputs = generator.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                 seed=args.seed, eos_ids=eos_ids)
    if args.speculative:
        stats = generator.last_speculative
        print(f"speculative: {stats.accepted}/{stats.drafts} drafts accepted "
              f"(acceptance rate {stats.acceptance_rate:.3f}), {stats.tokens_per_step:.2f} "
              f"tokens per main-model call", file=sys.stderr)
    records = generate_cli.result_records(requests, prompts, outputs, eos_ids,
                                          generate_cli.text_decoder(tokenizer))
    for record in records:
        if args.json:
            print(json.dumps(record))
        elif len(records) == 1:
            print(record.get("text", ",".join(map(str, record["ids"]))))
        else:
            print(f"[{record['prompt']}] " + json.dumps(record.get("text", record["ids"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
