"""The layer-by-layer driver shared by every calibrated method.

1. Capture: every decoder layer is swapped for a stand-in that records the
   positional and keyword arguments it is called with and passes the hidden
   states through unchanged. One forward of the calibration batch then yields
   the first layer's input and each layer's own kwargs (attention masks,
   position embeddings, ...), without naming any of them: architectures that
   give different layers different masks (Gemma3's sliding and full
   attention) are handled like the rest. The last stand-in stops the forward.
2. For each layer: move it to the device, let the method quantize it while it
   runs once on the calibration batch (the method returns the layer's output,
   computed with the quantized weights), move it back, feed the output to the
   next layer.

Only one decoder layer is on the device at a time; embeddings and the head
stay on the host. Between layers the calibration activations stay on the
device when they fit (a few copies of them, for the layer's own
intermediates, within the free device memory), on the host otherwise, moved
in for each layer's pass, and in a memory-mapped file when the host cannot
hold them (llmq.activations). With a streamer (llmq.stream) the layers
themselves live on the meta device and are read from disk when reached.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import arch, distributed
from .errors import LlmqError
from .activations import ActivationStore, activations_fit  # noqa: F401  (activations_fit: part of the engine's face)


class _StopForward(Exception):
    """Raised by the last stand-in: the rest of the model is not needed."""


class _Recorder(nn.Module):
    def __init__(self, layer: nn.Module, calls: list, last: bool, further_outputs: int = 0):
        super().__init__()
        self.layer = layer  # kept so attribute look-ups on the layer (e.g. attention_type) still work
        self.calls = calls
        self.last = last
        self.further_outputs = further_outputs  # what the layer returns after its hidden states (ArchSpec.passes)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _StopForward
        return (hidden_states, *[None] * self.further_outputs) if self.further_outputs else hidden_states


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, layers: nn.ModuleList | None = None,
                         spec: arch.ArchSpec | None = None) -> tuple[torch.Tensor, list]:
    """(hidden states entering layer 0, [(args, kwargs) of each layer]) for one batch.

    layers: the model's decoder layers (None: looked up with arch.decoder_layers).
    spec: the model's architecture entry (None: looked up with arch.arch_spec).
    """
    spec = spec or arch.arch_spec(model)
    if layers is None:
        _, layers = arch.decoder_layers(model, spec)
    originals = list(layers)
    calls: list = []
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, calls, last=i == len(originals) - 1, further_outputs=len(spec.passes))
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    except ValueError as e:
        if spec.passes or "unpack" not in str(e):
            raise
        # The model unpacks more from each layer than the hidden states the stand-in layers return.
        raise LlmqError(f"the decoder layers of {model_type!r} return more than their hidden states ({e}), and "
                        "llmq does not know what each hands on to the next: add `passes` to its ArchSpec in "
                        "llmq.arch.ARCHITECTURES, or use --method rtn, which runs no calibration") from e
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(calls) != len(originals):
        raise LlmqError(f"the forward of {model_type!r} on text reached {len(calls)} of the {len(originals)} "
                        f"layers llmq took for its decoder layers ({arch.decoder_layers(model, spec)[0]}), so they "
                        "cannot be calibrated: name its decoder layers in llmq.arch.ARCHITECTURES, or use "
                        "--method rtn, which runs no calibration")
    hidden = calls[0][0]
    names = {name for name in spec.passes if name is not None}
    return hidden, [_passed_by_keyword(layer, args, kwargs, names)
                    for layer, (_, args, kwargs) in zip(originals, calls)]


def _passed_by_keyword(layer: nn.Module, args: tuple, kwargs: dict, names: set) -> tuple[tuple, dict]:
    """(args, kwargs) of a layer's call, its positional arguments given by keyword where one of them is
    an argument a previous layer's output is passed on as (ArchSpec.passes): ZAYA1's model hands
    `prev_router_hidden_states` on positionally, and the engine hands it on by name."""
    params = list(inspect.signature(layer.forward).parameters.values())[1:len(args) + 1]  # after hidden_states
    if not any(p.name in names for p in params) or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        return args, kwargs
    return (), {**{p.name: value for p, value in zip(params, args)}, **kwargs}


LayerStep = Callable[[int, nn.Module, torch.Tensor, tuple, dict], tuple[torch.Tensor, str]]


@contextmanager
def _visiting(layers: nn.ModuleList, i: int, device: torch.device, streamer):
    """Layer i, read in first when streamed, on the device for the body of the with; back where it
    was afterwards (a streamer's release, which needs the layer's output, comes after)."""
    if streamer is not None:
        streamer.load(i)
    layer = layers[i]
    home = next(layer.parameters()).device
    layer.to(device)
    yield layer
    layer.to(home)


@torch.no_grad()
def run_layers(model: nn.Module, input_ids: torch.Tensor, step: LayerStep, *, device: torch.device,
               progress: bool = True, desc: str = "layers", keep_on_device: bool | None = None,
               layers: nn.ModuleList | None = None, streamer=None, activations: str | None = None,
               spec: arch.ArchSpec | None = None) -> torch.Tensor:
    """Drive `step` over every decoder layer and return the last layer's output.

    step(index, layer, hidden, args, kwargs) runs the layer (already on device)
    on hidden and returns (output hidden states, a short status for the
    progress bar). keep_on_device: keep the activations on the device between
    layers (None: when they fit, see activations_fit) or on the host.
    activations: "device", "host" or "disk" (a memory-mapped file) to force
    where they wait between layers (None: chosen, see llmq.activations).
    layers: the model's decoder layers (None: looked up with arch.decoder_layers).
    spec: the model's architecture entry (None: looked up with arch.arch_spec); its `passes` say
    which of a layer's further outputs go to the next layer.
    streamer: for a model whose layers are on the meta device (llmq.stream):
    streamer.load(i) materialises layer i before its pass, streamer.release(i,
    output, handed) writes it out and frees it after (handed: what it passes the
    next layer); streamer.captured() once the layers' inputs are captured;
    streamer.resume_point() gives (first layer to run, its input hidden states
    or None, what the last finished layer hands it) for a resumed run.
    """
    model.eval()
    spec = spec or arch.arch_spec(model)
    if layers is None:
        _, layers = arch.decoder_layers(model, spec)
    _warn_if_few_tokens(input_ids, layers)
    input_ids = distributed.my_windows(input_ids)  # several processes: each runs its share
    hidden, per_layer = capture_layer_inputs(model, input_ids, layers, spec)
    if streamer is not None:
        streamer.captured()  # the layers' inputs are known: the outer tensors can go
    if activations is None and keep_on_device is not None:
        activations = "device" if keep_on_device else "host"
    first = 0
    if streamer is not None:
        first, resumed, passed = streamer.resume_point()
        if resumed is not None:
            hidden = resumed  # the outputs of the layers finished before an interruption
            per_layer[first][1].update(passed)  # and what the last of them handed on
    store = ActivationStore(hidden, device, activations)
    if progress:
        print(store.describe(), file=sys.stderr)
    hidden = store.put(hidden)
    bar = tqdm(range(first, len(layers)), desc=desc, unit="layer", disable=not progress, initial=first,
               total=len(layers))
    passes = spec.passes
    for i in bar:
        with _visiting(layers, i, device, streamer) as layer, _further_outputs(layer, passes) as further:
            args, kwargs = to_device(per_layer[i], device)
            hidden, status = step(i, layer, hidden.to(device), args, kwargs)
            _check_quantized_layer(i, layer)
            handed = _pass_on(further(hidden), passes, per_layer[i + 1][1]) if i + 1 < len(layers) else {}
            hidden = store.put(hidden)
        if streamer is not None:
            streamer.release(i, hidden, handed)
        per_layer[i] = None  # free this layer's masks as soon as possible
        if status:
            bar.set_postfix_str(status)
    return hidden


@contextmanager
def _further_outputs(layer: nn.Module, passes: tuple):
    """Yields further(hidden): what the layer's forward that returned `hidden` returned after it
    (ArchSpec.passes; a step may run the layer several times, and its last run need not be the one
    whose output it returns)."""
    if not passes:
        yield lambda hidden: ()
        return
    outputs: list = []

    def record(module, args, out):
        if isinstance(out, (tuple, list)):
            outputs.append(out)

    handle = layer.register_forward_hook(record)
    try:
        yield lambda hidden: next((o[1:] for o in reversed(outputs) if o[0] is hidden),
                                  outputs[-1][1:] if outputs else ())
    finally:
        handle.remove()


def _pass_on(further: tuple, passes: tuple, next_kwargs: dict) -> dict:
    """Put the layer's further outputs into the next layer's keyword arguments, on the host (GLM-5's
    top-k indices are as large as an attention map's rows) until that layer runs; returns them."""
    handed = {name: value.cpu() if isinstance(value, torch.Tensor) else value
              for value, name in zip(further, passes) if name is not None}
    next_kwargs.update(handed)
    return handed


@torch.no_grad()
def each_layer(layers: nn.ModuleList, step: LayerStep, *, device: torch.device, progress: bool = True,
               desc: str = "layers", indices=None, streamer=None) -> None:
    """Drive `step` over decoder layers without data (methods that need no calibration).

    step(index, layer, None, (), {}) runs with the layer on the device; the layer
    goes back where it was afterwards. indices: the layers to visit (None: all).
    streamer: as for run_layers.
    """
    if indices is None:
        first = streamer.resume_point()[0] if streamer is not None else 0
        indices = range(first, len(layers))
    bar = tqdm(indices, desc=desc, unit="layer", disable=not progress)
    for i in bar:
        with _visiting(layers, i, device, streamer) as layer:
            _, status = step(i, layer, None, (), {})
            _check_quantized_layer(i, layer)
        if streamer is not None:
            streamer.release(i, None)
        if status:
            bar.set_postfix_str(status)


def _warn_if_few_tokens(input_ids: torch.Tensor, layers: nn.ModuleList) -> None:
    """Calibration with fewer tokens than a linear has inputs: its statistics (GPTQ's Hessian, AWQ's
    and SmoothQuant's activation ranges) rest on too few samples, and the result can be worse than
    round-to-nearest's, silently."""
    widest = max((m.in_features for m in layers.modules() if isinstance(m, nn.Linear)), default=0)
    if input_ids.numel() < widest:
        import warnings

        warnings.warn(f"calibration holds {input_ids.numel()} tokens, fewer than the {widest} inputs of the "
                      "widest linear: its statistics rest on too few samples and can do worse than RTN; "
                      "calibrate on more (--nsamples, --seqlen)", stacklevel=3)


def check_quantized(name: str, tensor: torch.Tensor, model_dtype: torch.dtype | None = None) -> None:
    """Refuse, by name, a tensor that quantizing left NaN or infinite (the model's own tensors were
    checked finite before): a scale past its dtype's range, or calibration activations that overflow
    the model's. A checkpoint holding it would not load."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        from .errors import LlmqError

        fix = ("the range of float16; quantize with --dtype bfloat16 (float32's range in 16 bits)"
               if torch.float16 in (tensor.dtype, model_dtype) else
               "float32's range (the model overflows on its calibration text: check it in full precision)")
        raise LlmqError(f"quantizing left {name} with NaN or infinite values: its weights or the calibration "
                        f"activations exceed {fix}, or keep the layer in full precision (--skip)")


def _check_quantized_layer(index: int, layer: nn.Module) -> None:
    model_dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), None)
    for name, tensor in (*layer.named_buffers(), *layer.named_parameters()):
        check_quantized(f"layer {index}'s {name}", tensor, model_dtype)


def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor, or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out
