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

from llmq.config import METHODS, QuantConfig
from llmq.errors import LlmqError
from llmq.eval.command import add_arguments, run


_FLAGS = {"act": "desc_act", "static": "static_groups"}


def parse_quantize(spec: str) -> QuantConfig:
    """'rtn:4:64:asym' -> QuantConfig(method='rtn', bits=4, group_size=64, sym=False).

    Optional trailing flags: ':act' (GPTQ act-order), ':static' (static groups).
    """
    parts = spec.split(":")
    flags = parts[4:]
    if (len(parts) < 4 or parts[0] not in METHODS or parts[3] not in ("sym", "asym")
            or any(f not in _FLAGS for f in flags)):
        raise LlmqError(f"bad --quantize {spec!r}: write METHOD:BITS:GROUP:sym|asym[:act][:static] with METHOD "
                        f"one of {', '.join(METHODS)}, e.g. rtn:4:64:asym")
    try:
        bits, group = int(parts[1]), int(parts[2])
    except ValueError as e:
        raise LlmqError(f"bad --quantize {spec!r}: bits and group size must be integers") from e
    return QuantConfig(method=parts[0], bits=bits, group_size=group, sym=parts[3] == "sym",
                       **{_FLAGS[f]: True for f in flags})


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
        config = parse_quantize(spec)

        def factory(config=config):
            return quantize(args.models[0], config, dataset=args.calib_dataset, device=args.device,
                            dtype=args.dtype, progress=False)

        models.append(factory)
        names.append(f"{args.models[0]} [{spec}, in memory]")
    return run(args, models, names)


if __name__ == "__main__":
    sys.exit(main())
