"""lm-evaluation-harness with llmq checkpoints: `python -m llmq.eval.harness ARGS`.

Runs lm-eval's own command line (same arguments as `lm_eval`) after
`import llmq`, so its Hugging Face backend (`--model hf --model_args
pretrained=CHECKPOINT`) builds QuantLinear layers from an llmq checkpoint.
Plain `lm_eval` does not import llmq: transformers then only warns about an
unknown quantization type and runs a model with random weights.
"""

from __future__ import annotations

import sys


def main() -> int:
    import llmq  # noqa: F401  (registers the "llmq" quantization method with transformers)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("llmq.eval.harness needs lm-evaluation-harness: pip install lm-eval", file=sys.stderr)
        return 2
    sys.argv[0] = "lm_eval"
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
