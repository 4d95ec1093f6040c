"""llmq.quantize: from a full-precision model to one holding QuantLinear modules."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings

import torch
from torch import nn

from . import arch
from .config import QuantConfig, names_module
from .data import DEFAULT_CALIBRATION, check_positions
from .errors import LlmqError
from .kernels.layout import codes_per_word
from .loading import load_model, resolve_device, resolve_dtype
from .methods.base import Job
from .modules.siblings import link_siblings

# The steps a user may pick as group size; the error for a group size that does
# not divide a layer lists those of them that would work.
_GROUP_SIZE_CHOICES = (8, 16, 32, 64, 128, 256, 512, 1024)


def plan(model: nn.Module, config: QuantConfig, device: torch.device, check_finite: bool = True) -> Job:
    """Resolve the architecture and the linears to quantize once, checked against the
    config (shapes, finite weights).

    check_finite=False for a skeleton on the meta device, whose weights are
    checked as they are read.
    """
    from .moe import prepare_experts

    spec = arch.arch_spec(model)
    prefix, layers = arch.decoder_layers(model, spec)
    arch.check_discovered_layers(model, spec)
    _check_names_round_trip(model)
    _check_skips(model, prefix, layers, config)
    config = _keep_what_the_model_reads(layers, config)
    # Mixture-of-experts blocks first: each experts module becomes a QuantExperts of
    # per-expert nn.Linear views, planned and quantized as linears; the routers join
    # modules_to_not_convert, in a copy of the config (the caller's stays as given).
    config = prepare_experts(model, prefix, layers, config)
    config = _keep_gates_that_do_not_pack(prefix, layers, config)
    config = _keep_what_would_not_load(model, prefix, layers, config)
    targets: dict[int, dict[str, str]] = {}
    shapes: dict[str, nn.Linear] = {}
    for i, layer in enumerate(layers):
        for local, module in arch.layer_linears(layer).items():
            name = f"{prefix}.{i}.{local}"
            if not config.skips(name):
                targets.setdefault(i, {})[local] = name
                shapes[name] = module
    if not targets:
        raise LlmqError("no linear layer left to quantize: check modules_to_not_convert")
    _check_plain(shapes)
    _check_shapes(shapes, config, prefix)
    if check_finite:
        _check_finite(model)
    return Job(model=model, config=config, spec=spec, layers=layers, targets=targets,
               scale_dtype=scale_dtype_for(next(model.parameters()).dtype), device=device)


def _check_names_round_trip(model: nn.Module) -> None:
    """Refuse, before any work, an architecture whose checkpoints transformers cannot read back: a
    tensor it saves under a name that its loader renames to another."""
    from .experts import find_experts
    from .folder_io import names_round_trip_gap

    gap = names_round_trip_gap(model, skip=find_experts(model))
    if gap is not None:
        import transformers

        name, stored, back = gap
        raise LlmqError(f"transformers {transformers.__version__} saves {name!r} of this {model.config.model_type} "
                        f"model as {stored!r} and loads that back as {back!r}, so no checkpoint of it would load: "
                        "quantize it with a transformers release whose conversion mapping for it round-trips")


def _keep_what_the_model_reads(layers: nn.ModuleList, config: QuantConfig) -> QuantConfig:
    """The linears that stay in full precision because the model's own code reads their weight
    (llmq.weight_reads), added to a copy of the config's modules_to_not_convert
    where the model has them: the checkpoint records them there, and the census lists them as kept."""
    from .weight_reads import linears_whose_weight_is_read

    names = {name for layer in layers for name, _ in layer.named_modules()}
    read = {local for layer in layers for local in linears_whose_weight_is_read(layer)}
    keep = [p for p in sorted(read) if p not in config.modules_to_not_convert
            and any(names_module(p, name) for name in names)]
    if not keep:
        return config
    return dataclasses.replace(config, modules_to_not_convert=[*config.modules_to_not_convert, *keep])


# The share of a model's linear weights that linears which do not pack may hold and still be kept without
# being asked: per-head and per-expert gates, not the weight matrices a run is for.
_GATE_SHARE = 0.01


def _keep_gates_that_do_not_pack(prefix: str, layers: nn.ModuleList, config: QuantConfig) -> QuantConfig:
    """The linears whose sizes are not multiples of the codes a packed word holds, where together they hold
    at most _GATE_SHARE of the linear weights (Gemma 3n's AltUp coefficients, 4 x 4 and 16 x 4, and its
    4-way modality router; OLMo hybrid's per-head gates, 30 x 3840): gates and mixing coefficients, kept
    in full precision like routers, recorded in a copy of modules_to_not_convert, and named in a warning.
    More than that, or an expert's projection, is refused by _check_shapes."""
    from .experts import inside_quant_experts

    per = codes_per_word(config.bits)
    total, unpacked = 0, {}
    for i, layer in enumerate(layers):
        for local, m in arch.layer_linears(layer).items():
            if config.skips(f"{prefix}.{i}.{local}"):
                continue
            total += m.weight.numel()
            if m.in_features % per or m.out_features % per:
                if inside_quant_experts(layer, local):
                    return config
                unpacked[local] = unpacked.get(local, 0) + m.weight.numel()
    share = sum(unpacked.values()) / max(total, 1)
    if not unpacked or share > _GATE_SHARE:
        return config
    names = sorted(unpacked)
    warnings.warn(f"keeping {len(names)} linear(s) per layer in full precision, whose sizes are not multiples of "
                  f"the {per} codes a {config.bits}-bit word holds ({share:.2%} of the linear weights): "
                  f"{', '.join(names)}", stacklevel=3)
    return dataclasses.replace(config, modules_to_not_convert=[*config.modules_to_not_convert, *names])


# Every tensor a quantized linear stores in place of its weight, in either scheme.
_QUANTIZED_LEAVES = ("qweight", "qzeros", "scales", "g_idx", "weight", "weight_scale", "input_scale", "bias")


def _keep_what_would_not_load(model: nn.Module, prefix: str, layers: nn.ModuleList,
                              config: QuantConfig) -> QuantConfig:
    """The linears whose quantized tensors transformers' conversion mapping would load back under other
    names (folder_io.modules_whose_tensors_do_not_round_trip): kept in full precision, recorded in a copy
    of modules_to_not_convert, and named in a warning."""
    from .experts import inside_quant_experts
    from .folder_io import modules_whose_tensors_do_not_round_trip

    names = [f"{prefix}.{i}.{local}" for i, layer in enumerate(layers)
             for local, m in arch.layer_linears(layer).items()
             if not config.skips(f"{prefix}.{i}.{local}") and not inside_quant_experts(layer, local)]
    broken = modules_whose_tensors_do_not_round_trip(model, names, _QUANTIZED_LEAVES)
    local = sorted({name.removeprefix(f"{prefix}.").partition(".")[2] for name in broken})
    if not local:
        return config
    warnings.warn(f"keeping {len(local)} linear(s) per layer in full precision, whose quantized tensors "
                  f"transformers would load back under other names: {', '.join(local)}", stacklevel=3)
    return dataclasses.replace(config, modules_to_not_convert=[*config.modules_to_not_convert, *local])


def _check_skips(model: nn.Module, prefix: str, layers: nn.ModuleList, config: QuantConfig) -> None:
    """Refuse a modules_to_not_convert pattern that names no linear layer, experts module or router: the
    layer its user meant to keep would be quantized."""
    from .experts import find_experts, find_routers

    found = {f"{prefix}.{i}.{local}": m for i, layer in enumerate(layers) for local, m in find_experts(layer).items()}
    experts = list(found)
    # Routers too: a stored config names them (they are kept by default), and the run keeps them again.
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)] + experts
    names += find_routers(model, found)
    for pattern in config.modules_to_not_convert:
        # "lm_head" is the default, and heads are never quantized: a head named otherwise
        # (GPT-NeoX's embed_out) is kept all the same.
        if pattern == "lm_head" or any(names_module(pattern, n) for n in names):
            continue
        first = next(iter(arch.layer_linears(layers[0])), None) if len(layers) else None
        example = f"{prefix}.0.{first} or {first}" if first else "a linear layer's name"
        if experts:
            example += f", or an experts module: {experts[0].removeprefix(prefix + '.0.')}"
        raise LlmqError(f"--skip {pattern!r} names no linear layer of this model, so it would keep nothing: a "
                        f"name matches a module whose dotted name equals it or ends with it after a dot, as "
                        f"the model has them loaded (e.g. {example})")


def scale_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    # Scales are stored in the model dtype; fp32 models store fp16 scales, which is
    # what the kernels read and keeps the checkpoint small.
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def quantize(model_or_path, config: QuantConfig, dataset=None, tokenizer=None, *,
             device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             nsamples: int = 128, seqlen: int = 512, seed: int = 0, progress: bool = True,
             report: dict | None = None, revision: str | None = None):
    """Quantize a model in memory and return it, its linears replaced by QuantLinear (a loaded model is
    changed in place and returned).

    Args:
        model_or_path: a transformers causal LM, a local folder or a hub id.
        config: what to do (method, bits, group size ...); not modified.
        dataset: calibration data for the methods that need it: a dataset spec,
            e.g. "wikitext2" or a local file, or pre-tokenized windows, an integer
            tensor [windows, tokens] of token ids used as given.
        tokenizer: used to tokenise the calibration text (loaded with the model when a path is given).
        device: where each layer is quantized ("auto": CUDA when available).
        dtype: dtype to load a model path in ("auto": as stored); a loaded model keeps its own.
        revision: the version of a hub model to load (a branch, tag or commit; None: main).
        nsamples, seqlen, seed: calibration windows drawn from a dataset spec.
        progress: show a progress bar over layers.
        report: if given, filled with where the time went (seconds: "calibration_data",
            "hessian", "solve" (GPTQ) or "stats", "scales", "clip", "quantize" (AWQ), "layers" = the
            whole layer loop, "total").
    """
    from .engine import each_layer, run_layers
    from .methods import registry

    t_start = time.perf_counter()
    report = {} if report is None else report
    device = resolve_device(device)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_tokenizer = load_model(model_or_path, resolve_dtype(dtype), revision)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        if dtype != "auto" and resolve_dtype(dtype) != next(model_or_path.parameters()).dtype:
            raise LlmqError(f"dtype={dtype!r} sets the dtype a model path is loaded in; this model is loaded "
                            "already: cast it first (model.to(dtype)) or drop dtype")
        model = model_or_path
    if getattr(model.config, "quantization_config", None):
        raise LlmqError("this model is already quantized: start from the full-precision model")
    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if dataset is not None and not isinstance(dataset, (str, torch.Tensor)):
        raise LlmqError(f"dataset must be a dataset spec (e.g. 'builtin' or a text file's path) or an integer "
                        f"tensor [windows, tokens] of token ids, not {type(dataset).__name__}")
    method = registry.for_config(config)
    method.check_data(config, dataset)
    calibrates = method.calibrates(config)
    if dataset is not None and not calibrates:
        warnings.warn("dataset is not read: this run needs no calibration data", stacklevel=2)
    job = plan(model, config, device)
    model.eval()
    method.check(job)
    calibration: dict = {}
    if calibrates:
        t0 = time.perf_counter()
        windows, calibration = _calibration(model, tokenizer, method.name, dataset, nsamples, seqlen, seed)
        report["calibration_data"] = time.perf_counter() - t0
    plans = {i: method.plan_layer(job, i, job.layers[i], names) for i, names in job.targets.items()}
    step = method.layer_step(job, plans)
    t1 = time.perf_counter()
    if calibrates:
        run_layers(model, windows, step, device=device, progress=progress, desc=method.name, layers=job.layers,
                   spec=job.spec)
    else:
        each_layer(job.layers, step, device=device, progress=progress, desc=method.name, indices=sorted(plans))
    report.update(layers=time.perf_counter() - t1, **step.timings)
    if getattr(step, "expert_tokens", None) is not None:
        report["experts"] = step.expert_tokens.summary()
    if step.damp_raised:
        warnings.warn("GPTQ raised the damping to factorise the Hessian of: " + ", ".join(step.damp_raised),
                      stacklevel=2)
    # What the model was calibrated on goes into the checkpoint; the caller's config stays as given.
    recorded = dataclasses.replace(job.config, calibration=calibration) if calibrates else job.config
    model.config.quantization_config = recorded.to_dict()
    link_siblings(model)
    report["total"] = time.perf_counter() - t_start
    return model


def _calibration(model, tokenizer, method: str, dataset, nsamples, seqlen, seed) -> tuple[torch.Tensor, dict]:
    """(token windows [n, seqlen], what they are, for the checkpoint's quantization_config)."""
    if isinstance(dataset, torch.Tensor):
        if (dataset.dim() != 2 or dataset.is_floating_point() or dataset.is_complex() or dataset.dtype == torch.bool
                or not dataset.numel()):
            raise LlmqError(f"calibration windows must be a non-empty integer tensor [windows, tokens] of token "
                            f"ids, not {dataset.dtype} of shape {tuple(dataset.shape)}")
        dataset = dataset.long()  # what embeddings take; and a uint8 range check would wrap
        vocab = model.get_input_embeddings().num_embeddings
        if dataset.min() < 0 or dataset.max() >= vocab:
            raise LlmqError(f"calibration windows hold token ids from {int(dataset.min())} to {int(dataset.max())}, "
                            f"outside this model's vocabulary of {vocab}: tokenise with the model's own tokenizer")
        n, length = dataset.shape
        check_positions(model.config, length)
        return dataset, {"dataset": "token windows", "nsamples": n, "seqlen": length}
    from .data import calibration_windows

    if tokenizer is None:
        what = "--scheme w8a8 with static activations, smoothing or GPTQ" if method == "w8a8" else f"--method {method}"
        raise LlmqError(f"{what} needs calibration text, and this model has no tokenizer: "
                        "add the tokenizer files to the model folder (from Python: pass tokenizer= to "
                        "llmq.quantize)")
    spec = dataset or DEFAULT_CALIBRATION
    check_positions(model.config, seqlen)
    windows = calibration_windows(tokenizer, spec, nsamples=nsamples, seqlen=seqlen, seed=seed, model=model)
    return windows, {"dataset": spec, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}


def _check_plain(targets: dict[str, nn.Linear]) -> None:
    """Refuse a linear whose class does more in its forward than the product: a quantized linear in its
    place would drop that, silently."""
    for name, module in targets.items():
        if not arch.is_plain_linear(module):
            raise LlmqError(f"layer {name} is a {type(module).__name__}, an nn.Linear with a forward of its own, "
                            f"which a quantized linear would not run: keep it in full precision with --skip {name} "
                            "(modules_to_not_convert)")


def _check_shapes(targets: dict[str, nn.Linear], config: QuantConfig, prefix: str) -> None:
    per = codes_per_word(config.bits)
    unpacked = [name for name, m in targets.items() if m.out_features % per or m.in_features % per]
    if unpacked:
        name = unpacked[0]
        n, k = targets[name].out_features, targets[name].in_features
        # Per-head gates (OLMo hybrid's a_proj and b_proj, 30 heads): one --skip per name keeps them all.
        keep = _skips_keeping(unpacked, prefix) or f"--skip {name} and the others"
        raise LlmqError(f"layer {name} has shape {n}x{k}; {config.bits}-bit packing needs both sizes "
                        f"to be multiples of {per} ({len(unpacked)} such layer(s)): keep them in full precision "
                        f"with {keep} (modules_to_not_convert)")
    bad = [name for name, m in targets.items() if m.in_features % config.group_size_for(m.in_features)]
    if bad:
        widths = sorted({m.in_features for m in targets.values()})
        common = math.gcd(*widths)
        working = [g for g in _GROUP_SIZE_CHOICES if common % g == 0 and g % per == 0]
        hint = ", ".join(map(str, working)) if working else "none of the usual sizes"
        name = bad[0]
        # The same linear in every layer (Nemotron-H's shared experts' down_proj): one --skip keeps them all.
        keep = _skips_keeping(bad, prefix) or f"--skip for each of {len(bad)} layers"
        raise LlmqError(f"group size {config.group_size} does not divide layer {name} "
                        f"({targets[name].in_features} input features; {len(bad)} such layer(s)); group sizes that "
                        f"work for every layer: {hint}, or -1 for one group per row; or keep them in full precision "
                        f"with {keep}")


def _skips_keeping(names: list[str], prefix: str) -> str | None:
    """The --skip options that keep the linears `names` in every layer (six at most), or None."""
    local = sorted({_skip_name(n, prefix) for n in names})
    return " ".join(f"--skip {n}" for n in local) if len(local) <= 6 else None


def _skip_name(name: str, prefix: str) -> str:
    """The --skip that keeps linear `name` in every layer: its name in the layer, or, for an expert's
    projection, its experts module (which --skip keeps whole)."""
    local = name.removeprefix(f"{prefix}.").partition(".")[2]
    return re.sub(r"\.\d+\.[^.]+$", "", local) if re.search(r"(^|\.)experts\.\d+\.[^.]+$", local) else local


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        check_finite(name, p)


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse a floating-point weight holding NaN or Inf, by name."""
    if weight.is_floating_point() and not torch.isfinite(weight).all():
        raise LlmqError(f"weight {name} contains NaN or Inf values: the model is damaged; "
                        "re-download or repair it before quantizing")
