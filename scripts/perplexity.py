#!/usr/bin/env python
"""Perplexity / KL / top-1 of several models on identical windows (as `llmq eval`),
optionally with quantized copies of the first model made in memory.

    python scripts/perplexity.py MODEL [MODEL ...] [--dataset SPEC] [--seqlen N] [--max-windows N]
        [--quantize METHOD:BITS:GROUP:sym|asym[:act] ...] [--calib-dataset SPEC] [--json PATH] [--plot PATH]

Each --quantize adds one model: the first MODEL, loaded again and quantized in
memory (nothing written), scored after the models given; e.g.
`--quantize rtn:4:64:asym --quantize rtn:8:-1:sym`. GPTQ/AWQ calibrate on
--calib-dataset. Models are still loaded one at a time.
"""

from __future__ import annotations

import argparse
import sys

from llmq.config import parse_config_spec
from llmq.errors import LlmqError
from llmq.eval.command import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perplexity.py")
    add_arguments(parser)
    parser.add_argument("--quantize", action="append", default=[], metavar="SPEC",
                        help="also score the first model quantized in memory: METHOD:BITS:GROUP:sym|asym "
                             "(repeatable)")
    parser.add_argument("--calib-dataset", default=None, help="calibration text for gptq/awq in --quantize")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except LlmqError as e:
        print(f"perplexity.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from llmq.pipeline import quantize

    models, names = list(args.models), list(args.models)
    for spec in args.quantize:
        config = parse_config_spec(spec)

        def factory(config=config):
            return quantize(args.models[0], config, dataset=args.calib_dataset, device=args.device,
                            dtype=args.dtype, progress=False)

        models.append(factory)
        names.append(f"{args.models[0]} [{spec}, in memory]")
    return run(args, models, names)


if __name__ == "__main__":
    sys.exit(main())
