"""awq+gptq: AWQ's scales and clipping, then GPTQ codes for the scaled weights (see methods/awq.py)."""

from .awq import AWQ

METHOD = AWQ("awq+gptq", use_gptq=True)
