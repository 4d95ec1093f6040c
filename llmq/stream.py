"""Calibrated quantization with the model streamed from its shards, one decoder layer at a time.

The model is built the way `from_pretrained` builds it, on the meta device.
Everything outside the decoder layers (embeddings, final norm, head, rotary
buffers) is loaded once, by transformers' own loader (`convert_and_load_state_dict_in_model`
given those keys, then its finalisation: non-persistent buffers, tied weights).
When the engine reaches a decoder layer, the same loader materialises that
layer from the source shards (its keys only, renamed and fused as
from_pretrained does: an MoE layer's per-expert tensors become its 3D expert
weights, which are then unrolled per expert as in memory); the method
quantizes it; its tensors (packed codes, scales, folded norms) go to the
output shards at once, under the names save_pretrained gives them; the layer
returns to the meta device. Host memory holds the outer tensors,
one layer and the calibration activations, whatever the number of layers.

The checkpoint is the one the in-memory path writes, tensor for tensor:
same loader, same engine, same method steps, same tensors saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from . import arch, distributed
from .config import QuantConfig
from .errors import LlmqError
from .experts import experts_layout, find_experts, unroll
from .folder_io import conversions_for_saving, names_on_load
from .modules.replace import replace_module
from .outdir import atomic_folder, handle_stale_partials
from .loading import resolve_device
from .memory import available_host_memory, return_freed_memory_promptly
from .pipeline import check_finite, plan
from .shards import ShardWriter, _open
from .skeleton import Skeleton

# Streaming is the default for calibrated methods when the model's tensors
# would take more than this fraction of the memory available to the process.
STREAM_FRACTION = 0.5
_SAMPLED_DATASETS = ("self", "model")


def stream_blocker(skeleton: Skeleton, fmt: str = "llmq", dataset=None,
                   config: QuantConfig | None = None) -> str | None:
    """Why this model cannot be streamed (None: it can)."""
    if skeleton.blocker:
        return skeleton.blocker
    if fmt != "llmq":
        return (f"--format {fmt} is written from a model in memory (a model too large for that streams to "
                f"--format llmq, then `llmq convert OUT DST --format {fmt}`)")
    if isinstance(dataset, str) and dataset in _SAMPLED_DATASETS:
        return f"--dataset {dataset} samples text from the whole model"
    return None


def should_stream(skeleton: Skeleton) -> bool:
    """The automatic choice: stream when the model would take too much of the available host memory."""
    available = available_host_memory()
    if available is None or skeleton.shards is None:
        return False
    return skeleton.model_bytes() > STREAM_FRACTION * available


def choose_route(skeleton: Skeleton, config: QuantConfig, fmt: str = "llmq", dataset=None,
                 stream: bool | None = None, resume: bool = False) -> tuple[str, str | None]:
    """("shards" | "stream" | "memory", a note for the user or None).

    Weight-only rtn goes shard by shard whenever it can (Skeleton.tensor_blocker);
    the rest stream when asked (stream=True) or, by default, when the model
    would not sit comfortably in host memory (should_stream). resume=True streams (only a
    streamed run can be resumed). stream=True or resume=True on a model that
    cannot be streamed is an error (LlmqError) naming the reason.
    """
    from .units import human_bytes

    if stream is False:
        return "memory", None
    # Shard by shard needs no forward pass: weight-only rtn. W8A8 layers are built by a layer step.
    by_shards = config.method == "rtn" and not config.quantizes_activations
    reason = stream_blocker(skeleton, fmt, dataset, config)
    if reason is not None:
        if stream or resume:
            raise LlmqError(f"cannot stream {skeleton.source}: {reason}; drop --stream to quantize it in memory")
        if by_shards:
            return "memory", f"quantizing in memory, not shard by shard: {reason}"
        return "memory", None
    if stream or resume:
        return "stream", None
    if by_shards and skeleton.tensor_blocker is None:
        return "shards", None
    if by_shards and not should_stream(skeleton):
        return "memory", f"quantizing in memory, not shard by shard: {skeleton.tensor_blocker}"
    if should_stream(skeleton):
        return "stream", (f"streaming the model layer by layer: its {human_bytes(skeleton.model_bytes())} would take "
                          f"more than {STREAM_FRACTION:.0%} of the {human_bytes(available_host_memory())} of host "
                          "memory available")
    return "memory", None


class LayerStreamer:
    """Materialises decoder layers from the source shards and writes them out when done.

    load(i): layer i's tensors, read by transformers' loader, on the host.
    release(i): layer i's tensors (as the method left them) to the output
    shards, and the layer back to the meta device.

    Tensors go out under the names `save_pretrained` gives them: transformers'
    load conversions reversed (a renamed MoE block takes its stored name
    back). Mixture-of-experts experts modules that planning unrolled per expert
    (llmq.moe.prepare_experts, on the meta skeleton) are loaded as transformers
    builds them, 3D weights fused from the stored per-expert tensors, and
    unrolled again over the loaded weights: the same QuantExperts, module for
    module, so the planned names hold.
    """

    def __init__(self, model: nn.Module, skeleton: Skeleton, writer: ShardWriter, *, checkpoint: dict | None = None,
                 resume_from: tuple[int, torch.Tensor | None, dict] = (0, None, {})):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import LoadStateDictConfig

        self.model = model
        self.skeleton = skeleton
        self.writer = writer
        self.prefix, self.layers = arch.decoder_layers(model)
        self.load_config = LoadStateDictConfig(
            dtype=skeleton.dtype, dtype_plan=model._get_dtype_plan(skeleton.dtype),
            weight_mapping=get_model_conversion_mapping(model), device_map={"": "cpu"})
        self._handles: dict[str, object] = {}
        self._params = {name for name, _ in model.named_parameters()}
        # Each layer's experts modules as transformers built them, before planning unrolls them.
        self._experts = {i: find_experts(layer) for i, layer in enumerate(self.layers)}
        # The conversions every stored name goes through, marked used as loading them would: reversed
        # for the output names, as save_pretrained reverses those of a model from_pretrained loaded.
        names_on_load(model, skeleton.shards.keys(), self.load_config.weight_mapping)
        # {"folder": partial folder, "fingerprint": ...}: record each finished layer for --resume.
        self.checkpoint = checkpoint
        self._resume_from = resume_from

    def resume_point(self) -> tuple[int, torch.Tensor | None, dict]:
        """(first layer to run, the hidden states entering it, or None to start from the captured ones,
        the keyword arguments the last finished layer hands it: ArchSpec.passes)."""
        return self._resume_from

    def _slices(self, keys: list[str]) -> dict:
        out = {}
        for key in keys:
            path = self.skeleton.shards.path(key)  # a hub shard is downloaded when first needed
            if path not in self._handles:
                self._handles[path] = _open(path).__enter__()
            out[key] = self._handles[path].get_slice(key)
        return out

    def _load(self, keys: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per layer would bury the engine's own
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, self._slices(keys), self.load_config)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        problems = [f"{k}: shape {a} on disk, {b} in the model" for k, a, b in sorted(info.mismatched_keys)]
        problems += [f"{k}: {e}" for k, e in info.conversion_errors.items()] + list(info.error_msgs)
        if problems:
            raise LlmqError(f"transformers could not load {len(problems)} tensors of {self.skeleton.source} "
                            f"({problems[0]}): the checkpoint does not match its config.json")

    def layer_keys(self, index: int) -> list[str]:
        head = f"{self.prefix}.{index}."
        return [k for k in self.skeleton.shards.keys() if k.startswith(head)]

    def load_outer(self) -> None:
        """Everything but the decoder layers, as from_pretrained loads it."""
        head = f"{self.prefix}."
        keys = [k for k in self.skeleton.shards.keys() if not k.startswith(head)]
        self._load(keys)
        for key in keys:
            if key in self._params:
                check_finite(key, self.model.get_parameter(key))
        # transformers' own finalisation: non-persistent buffers (rotary tables) off
        # the meta device and initialised, tied weights tied.
        self.model._move_missing_keys_from_meta_to_device(set(), None, None, None)
        self.model._initialize_missing_keys(False)
        self.model.tie_weights()

    def load(self, index: int) -> None:
        layer = self.layers[index]
        unrolled = []
        for local, original in self._experts[index].items():
            if layer.get_submodule(local) is not original:  # planning unrolled it: load the original
                replace_module(layer, local, original)
                unrolled.append(local)
        self._load(self.layer_keys(index))
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if tensor.device.type == "meta":
                raise LlmqError(f"the checkpoint of {self.skeleton.source} gives no tensor for "
                                f"{self.prefix}.{index}.{name}: it is damaged or was written for another model")
            if tensor.is_floating_point():
                check_finite(f"{self.prefix}.{index}.{name}", tensor)
        for local in unrolled:
            original = layer.get_submodule(local)
            full = f"{self.prefix}.{index}.{local}"
            replace_module(layer, local, unroll(original, experts_layout(original, full, self.model)))

    def release(self, index: int, hidden: torch.Tensor | None = None, passes: dict | None = None) -> None:
        from . import resume
        from .outdir import test_point

        layer = self.layers[index]
        if self.writer is not None:
            state = {f"{self.prefix}.{index}.{name}": t for name, t in layer.state_dict().items()}
            for name, tensor in self._as_saved(state).items():
                self.writer.add(name, tensor)
        layer.to("meta")
        for original in self._experts[index].values():  # its loaded 3D weights, which the unrolled views shared
            original.to("meta")
        if self.checkpoint is not None:
            report = self.checkpoint.get("report")
            resume.save(self.checkpoint["folder"], self.checkpoint["fingerprint"], index + 1,
                        self.writer.state() if self.writer is not None else None,
                        hidden, report() if report is not None else None, passes)
        test_point(f"layer-{index}")  # lets the tests kill the run here

    def captured(self) -> None:
        """The layers' inputs are captured: the outer tensors (embeddings, final norm, head) are no
        longer needed. They go to the output now (unless a resumed run wrote them already) and
        back to the meta device, so that they do not sit in memory beside every layer."""
        if self._resume_from[0] == 0:
            self.write_outer()
        head = f"{self.prefix}."
        for name, module in self.model.named_modules():
            if name and not (name + ".").startswith(head) and not head.startswith(name + "."):
                for pname, p in list(module.named_parameters(recurse=False)):
                    setattr(module, pname, nn.Parameter(p.to("meta"), requires_grad=p.requires_grad))

    def write_outer(self) -> None:
        if self.writer is None:
            return
        head = f"{self.prefix}."
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        state = {name: t for name, t in self.model.state_dict().items()
                 if not name.startswith(head) and name not in tied}
        for name, tensor in self._as_saved(state).items():
            self.writer.add(name, tensor)

    def _as_saved(self, state: dict) -> dict:
        """state (model names) under the names save_pretrained writes: the used load conversions reversed."""
        used = [c for c in self.load_config.weight_mapping if c.was_used()]
        if not used:
            return state
        from transformers.core_model_loading import revert_weight_conversion

        # What from_pretrained leaves on a model it loaded, less what would fuse quantized tensors.
        self.model._weight_conversions = conversions_for_saving(self.model, state, used)
        return revert_weight_conversion(self.model, state)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def quantize_streamed(skeleton: Skeleton, out: str | os.PathLike, config: QuantConfig, *, dataset=None,
                      tokenizer=None, device: str | torch.device = "auto", nsamples: int = 128, seqlen: int = 512,
                      seed: int = 0, overwrite: bool = False, progress: bool = True, resume: bool = False,
                      max_shard_size: int = 4 * 10**9, report: dict | None = None) -> Path:
    """Quantize the model at skeleton.source and write it to out, layer by layer.

    Each finished layer is recorded in the partial folder (llmq.resume), which
    is kept when the run fails; resume=True continues the interrupted run of
    the same model, data and options from its first unfinished layer.
    """
    from . import resume as resuming
    from .engine import each_layer, run_layers
    from .methods import registry
    from .pipeline import _calibration
    from .shard_rtn import write_config

    reason = stream_blocker(skeleton, dataset=dataset, config=config)
    if reason:
        raise ValueError(f"cannot stream {skeleton.source}: {reason}")
    method = registry.for_config(config)
    method.check_data(config, dataset)
    return_freed_memory_promptly()
    t_start = time.perf_counter()
    report = {} if report is None else report
    device = resolve_device(device)
    model = skeleton.model
    calibrates = method.calibrates(config)
    windows, calibration = None, {}
    if calibrates:
        t0 = time.perf_counter()
        windows, calibration = _calibration(model, tokenizer, method.name, dataset, nsamples, seqlen, seed)
        report["calibration_data"] = time.perf_counter() - t0
    fingerprint = resuming.fingerprint(skeleton.folder, config, device, skeleton.dtype, windows, dataset,
                                       hub=skeleton.shards.hub)
    # With several processes rank 0 does the file system work and shares the outcome (refusals included).
    found = distributed.from_writer(lambda: resuming.find(out, fingerprint)) if resume else None  # refuses a
    adopt, state = found if found else (None, None)  # mismatch before touching anything
    writing = distributed.is_writer()  # with several processes, rank 0 writes
    if resume and writing:  # the others (a run killed after it finished, other settings)
        handle_stale_partials(out, overwrite, keep=adopt)
    with contextlib.ExitStack() as stack:
        # Every process records its share of the next layer's inputs in the partial folder (llmq.resume).
        tmp = distributed.from_writer(lambda: stack.enter_context(atomic_folder(
            out, overwrite, [skeleton.source], adopt=adopt, keep_if=resuming.resumable)))
        if state:
            writer = ShardWriter.resume(tmp, state["writer"]) if writing else None
            resume_from = (state["layers_done"], *resuming.load_hidden(tmp, state))
            if progress and writing:
                print(f"resuming from layer {state['layers_done']} in {tmp}", file=sys.stderr)
        else:
            writer = ShardWriter(tmp, max_shard_size) if writing else None
            resume_from = (0, None, {})
            if resume and progress and writing:
                print(f"note: --resume found no interrupted run of {out} to continue: starting from the first "
                      "layer", file=sys.stderr)
        checkpoint = {"folder": tmp, "fingerprint": fingerprint}
        streamer = LayerStreamer(model, skeleton, writer, checkpoint=checkpoint, resume_from=resume_from)
        try:
            streamer.load_outer()
            job = plan(model, config, device, check_finite=False)
            method.check(job)
            plans = {i: method.plan_layer(job, i, job.layers[i], names) for i, names in job.targets.items()}
            step = method.layer_step(job, plans)
            experts = getattr(step, "expert_tokens", None)
            if experts is not None:  # the report covers the layers an interrupted run finished
                if state and state.get("report"):
                    experts.restore(state["report"])
                checkpoint["report"] = experts.state
            t1 = time.perf_counter()
            if calibrates:
                run_layers(model, windows, step, device=device, progress=progress, desc=method.name,
                           layers=job.layers, streamer=streamer, spec=job.spec)
            else:
                each_layer(job.layers, step, device=device, progress=progress, desc=method.name,
                           streamer=streamer)  # every layer: those without targets are written too
            report.update(layers=time.perf_counter() - t1, **step.timings)
            if getattr(step, "expert_tokens", None) is not None:
                report["experts"] = step.expert_tokens.summary()
            if not calibrates:
                streamer.write_outer()  # no capture: the outer tensors were never written
        except BaseException as exc:
            if progress and writing and resuming.resumable(tmp, exc):
                print(f"llmq: note: the finished layers are kept in {tmp}: rerun with --resume to continue",
                      file=sys.stderr)
            raise
        finally:
            streamer.close()
        if step.damp_raised:
            warnings.warn("GPTQ raised the damping to factorise the Hessian of: " + ", ".join(step.damp_raised),
                          stacklevel=2)
        if not writing:
            return Path(out)
        # The planned config: it names the routers an MoE model keeps (llmq.moe.prepare_experts).
        recorded = dataclasses.replace(job.config, calibration=calibration) if calibrates else job.config
        writer.finish()
        resuming.clear(tmp)
        model.config.quantization_config = recorded.to_dict()
        write_config(skeleton.folder, model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    report["total"] = time.perf_counter() - t_start
    return Path(out)
