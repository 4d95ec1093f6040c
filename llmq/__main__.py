"""`python -m llmq ...`: the console script, also what `torchrun -m llmq` runs."""

import sys

from .cli import main

sys.exit(main())
