"""llmq: post-training weight-only quantization of Hugging Face language models."""

__version__ = "0.1.0"

from .config import QuantConfig  # noqa: E402
from .errors import LlmqError  # noqa: E402

__all__ = ["QuantConfig", "LlmqError", "__version__"]
