"""llmq: post-training weight-only quantization of Hugging Face language models.

    import llmq
    model = llmq.quantize("meta-llama/Llama-3.1-8B", llmq.QuantConfig(method="gptq", bits=4))
    llmq.save(model, "out", tokenizer)
    model = llmq.from_pretrained("out")   # or AutoModelForCausalLM.from_pretrained after `import llmq`

Importing llmq registers the "llmq" quantization method with transformers and
does nothing else: no GPU probe, no global flags.
"""

from ._version import __version__
from .config import QuantConfig  # noqa: E402
from .dequantize import dequantize  # noqa: E402
from .errors import LlmqError  # noqa: E402
from .formats.native import save  # noqa: E402
from .hf import register as _register  # noqa: E402
from .loading import from_pretrained  # noqa: E402
from .modules.qlinear import QuantLinear  # noqa: E402
from .pipeline import quantize  # noqa: E402

_register()

__all__ = ["QuantConfig", "LlmqError", "QuantLinear", "quantize", "save", "from_pretrained", "dequantize",
           "__version__"]
