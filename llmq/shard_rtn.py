"""Round-to-nearest straight from the input shards to the output shards.

RTN needs no forward pass, so no model is built: each tensor is read from the
source safetensors when its turn comes, quantized if it is the weight of a
linear llmq quantizes, written to the output shards, and dropped. Host memory
stays around one tensor (plus its float32 working copy), whatever the model's
size; the run is bound by disk speed.

The output equals, tensor for tensor and bit for bit, what loading the model
with `from_pretrained`, `llmq.quantize(method="rtn")` and `llmq.save` give:
the same dtype casts (the dtype from_pretrained picks), the same solver on the
same device, the same packing, the same tied tensors left out, the same
config.json. Models for which reading the shards tensor by tensor would not
give what from_pretrained gives are refused here (skeleton.Skeleton.tensor_blocker)
and quantized in memory by the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import QuantConfig
from .engine import check_quantized
from .outdir import atomic_folder
from .loading import resolve_device
from .memory import return_freed_memory_promptly
from .pipeline import check_finite, plan
from .shards import ShardWriter
from .skeleton import Skeleton
from .solvers.rtn import rtn_quantize


def quantize_rtn_shards(skeleton: Skeleton, out: str | os.PathLike, config: QuantConfig, *,
                        device: str | torch.device = "auto", tokenizer=None, overwrite: bool = False,
                        progress: bool = True, max_shard_size: int = 4 * 10**9) -> Path:
    """Write the RTN-quantized checkpoint of skeleton's source to out, one tensor at a time."""
    if config.method != "rtn":
        raise ValueError("shard-by-shard quantization is round-to-nearest only")
    if skeleton.tensor_blocker:
        raise ValueError(f"cannot quantize {skeleton.source} shard by shard: {skeleton.tensor_blocker}")
    return_freed_memory_promptly()
    device = resolve_device(device)
    model = skeleton.model
    job = plan(model, config, device, check_finite=False)
    targets = {name for names in job.targets.values() for name in names.values()}
    params = {name for name, _ in model.named_parameters()}
    meta_sd = model.state_dict()
    sdtype = job.scale_dtype
    shards = skeleton.shards
    with atomic_folder(out, overwrite, [skeleton.source]) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for key in tqdm(skeleton.expected_keys(), desc="rtn", unit="tensor", disable=not progress):
            module_name, _, leaf = key.rpartition(".")
            tensor = shards.read(key)
            if tensor.is_floating_point():
                tensor = tensor.to(meta_sd[key].dtype)  # the cast from_pretrained makes
            if key in params:
                check_finite(key, tensor)
            if module_name not in targets:
                writer.add(key, tensor)
            elif leaf == "weight":
                w = tensor.to(device)
                qw = rtn_quantize(w, config.bits, config.group_size_for(w.shape[1]), config.sym, sdtype)
                for name, packed in qw.packed().items():
                    check_quantized(f"{module_name}.{name}", packed)
                    writer.add(f"{module_name}.{name}", packed)
                del w, qw
            elif leaf == "bias":
                writer.add(key, tensor.to(sdtype))  # QuantLinear keeps its bias in the scales' dtype
            else:
                raise ValueError(f"linear {module_name} has a tensor {leaf!r} llmq does not know")
            del tensor
        shards.close()
        writer.finish()
        model.config.quantization_config = config.to_dict()
        write_config(skeleton.folder, model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def write_config(source: str, model, folder: Path) -> None:
    """config.json and generation_config.json as model.save_pretrained writes them for the loaded model
    (model.config.quantization_config set by the caller)."""
    from transformers import GenerationConfig

    model.config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        try:
            generation = GenerationConfig.from_pretrained(source)
        except OSError:
            generation = model.generation_config
        generation.save_pretrained(folder)
