"""llmq.quantize: from a full-precision model to one holding QuantLinear modules."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import arch
from .config import QuantConfig
from .errors import LlmqError
from .formats.packing import codes_per_word
from .loading import load_model, resolve_device, resolve_dtype
from .modules.qlinear import QuantLinear
from .modules.replace import replace_module
from .solvers.rtn import rtn_quantize

# The steps a user may pick as group size; the error for a group size that does
# not divide a layer lists those of them that would work.
_GROUP_SIZE_CHOICES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Target:
    """One linear to quantize: its full name and its place inside a decoder layer."""

    name: str  # full dotted name in the model
    layer_index: int
    local_name: str  # name relative to the decoder layer
    module: nn.Linear


def plan(model: nn.Module, config: QuantConfig) -> list[Target]:
    """The linears to quantize, checked against the config (shapes, finite weights)."""
    prefix, layers = arch.decoder_layers(model)
    targets = []
    for i, layer in enumerate(layers):
        for local, module in arch.layer_linears(layer).items():
            name = f"{prefix}.{i}.{local}"
            if not config.skips(name):
                targets.append(Target(name, i, local, module))
    if not targets:
        raise LlmqError("no linear layer left to quantize: check modules_to_not_convert")
    _check_shapes(targets, config)
    _check_finite(model)
    return targets


def scale_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    # Scales are stored in the model dtype; fp32 models store fp16 scales, which is
    # what the kernels read and keeps the checkpoint small.
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def quantize(model_or_path, config: QuantConfig, dataset=None, tokenizer=None, *,
             device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             nsamples: int = 128, seqlen: int = 512, seed: int = 0, progress: bool = True,
             report: dict | None = None):
    """Quantize a model in memory and return it, its linears replaced by QuantLinear.

    Args:
        model_or_path: a transformers causal LM, a local folder or a hub id.
        config: what to do (method, bits, group size ...).
        dataset: calibration dataset spec (GPTQ/AWQ), e.g. "wikitext2" or a local file.
        tokenizer: used to tokenise the calibration text (loaded with the model when a path is given).
        device: where each layer is quantized ("auto": CUDA when available).
        dtype: dtype to load a model path in ("auto": as stored).
        nsamples, seqlen, seed: calibration windows.
        progress: show a progress bar over layers.
        report: if given, filled with where the time went (seconds: "calibration_data",
            "hessian", "solve" (GPTQ) or "stats", "scales", "clip", "quantize" (AWQ), "layers" = the
            whole layer loop, "total").
    """
    t_start = time.perf_counter()
    report = {} if report is None else report
    device = resolve_device(device)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_tokenizer = load_model(model_or_path, resolve_dtype(dtype))
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = model_or_path
    if getattr(model.config, "quantization_config", None):
        raise LlmqError("this model is already quantized: start from the full-precision model")
    targets = plan(model, config)
    model.eval()
    sdtype = scale_dtype_for(next(model.parameters()).dtype)
    if config.method == "rtn":
        _quantize_rtn(model, targets, config, sdtype, device, progress)
    elif config.method == "gptq":
        t0 = time.perf_counter()
        windows = _calibration(model, tokenizer, config, dataset, nsamples, seqlen, seed)
        t1 = time.perf_counter()
        step = _quantize_gptq(model, windows, targets, config, sdtype, device, progress)
        report.update(calibration_data=t1 - t0, layers=time.perf_counter() - t1, **step.timings)
    elif config.method in ("awq", "awq+gptq"):
        _check_awq(model)
        t0 = time.perf_counter()
        windows = _calibration(model, tokenizer, config, dataset, nsamples, seqlen, seed)
        t1 = time.perf_counter()
        step = _quantize_awq(model, windows, targets, config, sdtype, device, progress)
        report.update(calibration_data=t1 - t0, layers=time.perf_counter() - t1, **step.timings)
    else:
        raise LlmqError(f"--method {config.method} is not available in this version of llmq yet: "
                        "use --method gptq or rtn")
    model.config.quantization_config = config.to_dict()
    report["total"] = time.perf_counter() - t_start
    return model


DEFAULT_DATASET = "wikitext2"


def _calibration(model, tokenizer, config, dataset, nsamples, seqlen, seed) -> torch.Tensor:
    from .data import calibration_windows

    if tokenizer is None:
        raise LlmqError(f"--method {config.method} needs calibration text, and this model has no tokenizer: "
                        "add the tokenizer files to the model folder or pass tokenizer=")
    spec = dataset or DEFAULT_DATASET
    windows = calibration_windows(tokenizer, spec, nsamples=nsamples, seqlen=seqlen, seed=seed, model=model)
    config.calibration = {"dataset": spec, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    return windows


def _quantize_gptq(model, windows, targets, config, scale_dtype, device, progress):
    from .engine import run_layers
    from .methods.gptq import GPTQLayerStep

    spec = arch.arch_spec(model)
    _, layers = arch.decoder_layers(model)
    by_layer: dict[int, dict[str, str]] = {}
    for t in targets:
        by_layer.setdefault(t.layer_index, {})[t.local_name] = t.name
    groups = {i: [[(local, names[local]) for local in group]
                  for group in arch.sequential_groups(spec, layers[i], list(names))]
              for i, names in by_layer.items()}
    step = GPTQLayerStep(config, groups, scale_dtype)
    run_layers(model, windows, step, device=device, progress=progress, desc="gptq")
    if step.damp_raised:
        warnings.warn("GPTQ raised the damping to factorise the Hessian of: " + ", ".join(step.damp_raised),
                      stacklevel=2)
    return step


def _check_awq(model):
    # Refuse before the calibration text is read when the architecture has no scale groups.
    from .methods.awq import require_scale_groups

    require_scale_groups(arch.arch_spec(model), model.config)


def _quantize_awq(model, windows, targets, config, scale_dtype, device, progress, **step_options):
    from .engine import run_layers
    from .methods.awq import AWQLayerStep, build_units

    spec = arch.arch_spec(model)
    _, layers = arch.decoder_layers(model)
    by_layer: dict[int, dict[str, str]] = {}
    for t in targets:
        by_layer.setdefault(t.layer_index, {})[t.local_name] = t.name
    units = {i: build_units(spec, layers[i], names, model.config) for i, names in by_layer.items()}
    step = AWQLayerStep(config, units, scale_dtype, **step_options)
    run_layers(model, windows, step, device=device, progress=progress, desc=config.method)
    if step.damp_raised:
        warnings.warn("GPTQ raised the damping to factorise the Hessian of: " + ", ".join(step.damp_raised),
                      stacklevel=2)
    return step


def _quantize_rtn(model, targets, config, scale_dtype, device, progress):
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer_index, []).append(t)
    bar = tqdm(by_layer.items(), desc="rtn", unit="layer", disable=not progress)
    for i, layer_targets in bar:
        errs = []
        for t in layer_targets:
            w = t.module.weight.detach().to(device)
            qw = rtn_quantize(w, config.bits, config.group_size_for(w.shape[1]), config.sym, scale_dtype)
            errs.append(((qw.dequantize() - w.float()).norm() / w.float().norm()).item())
            bias = None if t.module.bias is None else t.module.bias.detach()
            replace_module(model, t.name, QuantLinear.from_quantized(qw, bias).to("cpu"))
        bar.set_postfix(rel_err=f"{max(errs):.4f}")


def _check_shapes(targets: list[Target], config: QuantConfig) -> None:
    per = codes_per_word(config.bits)
    for t in targets:
        n, k = t.module.out_features, t.module.in_features
        if n % per or k % per:
            raise LlmqError(f"layer {t.name} has shape {n}x{k}; {config.bits}-bit packing needs both sizes "
                            f"to be multiples of {per}: add it to modules_to_not_convert")
    if config.group_size == -1:
        return
    bad = [t for t in targets if t.module.in_features % config.group_size]
    if bad:
        widths = sorted({t.module.in_features for t in targets})
        common = math.gcd(*widths)
        working = [g for g in _GROUP_SIZE_CHOICES if common % g == 0 and g % per == 0]
        hint = ", ".join(map(str, working)) if working else "none of the usual sizes"
        t = bad[0]
        raise LlmqError(f"group size {config.group_size} does not divide layer {t.name} "
                        f"({t.module.in_features} input features); group sizes that work for every layer: "
                        f"{hint}, or -1 for one group per row")


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LlmqError(f"weight {name} contains NaN or Inf values: the model is damaged; "
                            "re-download or repair it before quantizing")
