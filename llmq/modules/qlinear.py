"""QuantLinear: a linear layer whose weight is stored as packed integer codes.

Buffers are named and shaped exactly as in the native checkpoint (K =
in_features, N = out_features, G = number of groups, b = bits):

    qweight int32 [K*b/32, N]   codes packed along K, LSB first
    qzeros  int32 [G, N*b/32]   true zero points packed along N
    scales  float [G, N]
    g_idx   int32 [K]           only with act-order
    bias    float [N]           only when the layer has one

so `load_state_dict` / transformers' loader assign checkpoint tensors directly.

Forward: on CUDA, llmq.kernels.dequant_matmul reads the packed buffers
(Triton). An act-order layer whose groups are full runs of group_size inputs
(what GPTQ writes) is re-laid out in place when it is placed on its CUDA device
(`act_order = "reorder"`, the default): qweight's rows are sorted by group and
x is permuted on each call, so the kernels take their plain grouped path
instead of looking up every input's scale and zero point (`"gather"` keeps the
checkpoint layout and does the lookup). The state dict, `quantized_weight()`
and saving always give the checkpoint layout.

On CPU the buffers are converted, when the layer is placed, into the form of
the fastest CPU backend (llmq.kernels.cpu: torch's int4/int8 weight-only
kernels, or a dense weight), kept outside the state dict; each call then runs,
for its number of rows, the kernel measured fastest on this processor
(llmq.kernels.cpu_select). `cpu_backend` picks the form: "auto" (default), "int4pack", "int8pack", or "dense"
(exact in the activation dtype; as much memory as the unquantized layer).

An input that requires a gradient (grad mode on) gets one, through the
dequantized weight (modules/input_grad.py); the kernels have no backward.

When the runtime form is decided: a layer is placed once its buffers hold
checkpoint values (`post_load()`, which `from_quantized` and llmq's
transformers loader call; `load_state_dict` does the same) and again whenever `.to()`, `.cuda()`,
`.half()` ... give it new tensors (`_apply`). A buffer put in from outside
(transformers' loader, accelerate's `set_module_tensor_to_device` and
offloading hooks, which write `module._buffers[name]` directly) drops the
form built from the old tensor on the spot (`_WatchedBuffers`); the next call
builds it again from the new one. So does the first call of a layer whose
buffers were filled in place without `post_load()`, and the first call after a
buffer was written in place (`layer.scales.mul_(2)`, or copying a checkpoint's
tensors over `state_dict()`'s): the form records the buffers' version counters
it was built from. A dense CPU weight is kept in the activation dtype: an
input of another dtype rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.layout import codes_per_word, group_width, pack_rows, unpack_cols, unpack_rows
from ..kernels import cpu_matmul, dequant_matmul, prepare_cpu, reorder_act_order
from ..qweight import QuantizedWeight
from .input_grad import wants_input_gradient, with_input_gradient


# The buffers a runtime form is built from.
CHECKPOINT_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


class RuntimeForm:
    """What a QuantLinear computes with beyond its checkpoint buffers, built from the present ones.

    kernel_ready: the CUDA kernels' layout is decided for the present codes (act-order rows
    sorted by group or not; the layer's `perm` is set exactly when they are sorted).
    cpu: the CPU backend's form (llmq.kernels.CpuState), or None.
    act_dtype: the activation dtype the CPU form was last built for.
    version: bumped whenever the buffers change, for forms built from several layers
    (QuantExperts' stacked experts, modules/siblings.py).
    built_from: the buffers' version counters when the form was last built (`buffer_versions`),
    or None: a buffer written in place since makes the form stale.
    """

    def __init__(self):
        self.kernel_ready = False
        self.cpu = None
        self.act_dtype = None
        self.version = 0
        self.built_from = None

    def invalidate(self) -> None:
        self.kernel_ready = False
        self.cpu = None
        self.version += 1
        self.built_from = None


class _WatchedBuffers(dict):
    """A QuantLinear's buffer table (its `_buffers`).

    A tensor put in from outside replaces checkpoint values: transformers' loader,
    accelerate's set_module_tensor_to_device (used by its offloading hooks), which
    write `module._buffers[name]` directly, setattr and register_buffer all come
    through here. The runtime form built from the old tensor is dropped on the spot,
    and a new qweight holds the checkpoint layout, so the old sort order goes too.
    The layer's own moves write with `quiet` set: moved codes keep their layout.
    """

    def __init__(self, form: RuntimeForm):
        super().__init__()
        self.form = form
        self.quiet = False

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        if not self.quiet and name in CHECKPOINT_BUFFERS:
            self.form.invalidate()
            if name == "qweight" and "perm" in self:
                super().__setitem__("perm", None)

    def __reduce__(self):
        # A copy (deepcopy, pickle) is rebuilt without notifications: it shares the copied
        # layer's form, which stays valid for the copied tensors.
        return _watched_buffers, (self.form, dict(self))


def buffer_versions(buffers: dict) -> tuple:
    """The version counters of a QuantLinear's checkpoint buffers (its `_buffers` table): each
    in-place write moves its tensor's. Read on every CPU call, so spelled out. Inference-mode
    tensors (a layer built under inference mode) have none: (), untracked."""
    qweight, g_idx = buffers["qweight"], buffers.get("g_idx")
    if qweight.is_inference():
        return ()
    try:
        return (qweight._version, buffers["qzeros"]._version, buffers["scales"]._version,
                None if g_idx is None else g_idx._version)
    except RuntimeError:  # another buffer is an inference-mode tensor
        return ()


def _watched_buffers(form: RuntimeForm, items: dict) -> _WatchedBuffers:
    table = _WatchedBuffers(form)
    dict.update(table, items)
    return table


class QuantLinear(nn.Module):
    default_cpu_backend = "auto"  # what new layers use on CPU; see the module doc
    default_act_order = "reorder"  # how new act-order layers run the CUDA kernels; see the module doc

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int,
                 bias: bool = False, desc_act: bool = False, dtype: torch.dtype = torch.float16,
                 device=None):
        super().__init__()
        per = codes_per_word(bits)
        gs = group_width(group_size, in_features)
        if in_features % gs or in_features % per or out_features % per:
            raise ValueError(f"a {bits}-bit layer of shape {out_features}x{in_features} with group size "
                             f"{group_size} cannot be packed")
        self._form = RuntimeForm()
        self.__dict__["_buffers"] = _WatchedBuffers(self._form)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = gs
        self.desc_act = desc_act
        groups = in_features // gs
        self.register_buffer("qweight", torch.empty(in_features // per, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // per, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=dtype, device=device))
        if desc_act:
            self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cpu_backend = self.default_cpu_backend
        self.cpu_prefill_dense = False
        self.act_order = self.default_act_order
        # Set exactly while qweight's rows are sorted by group: x[..., perm] feeds the kernels. Never in a
        # state dict (_checkpoint_layout_in_state_dict), yet registered as persistent: accelerate moves
        # every non-persistent buffer name, and fails on one that holds None.
        self.register_buffer("perm", None)
        self.register_state_dict_post_hook(_checkpoint_layout_in_state_dict)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from a solver's result; scales keep their dtype, bias is cast to it."""
        n, k = qw.shape
        layer = cls(k, n, bits=qw.bits, group_size=qw.group_size, bias=bias is not None,
                    desc_act=qw.g_idx is not None, dtype=qw.scales.dtype, device=qw.codes.device)
        for name, tensor in qw.packed().items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.data.copy_(bias.to(qw.scales.dtype))
        layer.post_load()
        return layer

    def checkpoint_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint's layout (rows unsorted when the layer was re-laid out)."""
        if self.perm is None:
            return self.qweight
        sorted_codes = unpack_rows(self.qweight, self.bits)
        codes = torch.empty_like(sorted_codes)
        codes[self.perm] = sorted_codes
        return pack_rows(codes, self.bits)

    def quantized_weight(self) -> QuantizedWeight:
        """Unpack the buffers back into integer codes, scales and zeros."""
        return QuantizedWeight(
            codes=unpack_rows(self.checkpoint_qweight(), self.bits).t(),
            scales=self.scales.t(),
            zeros=unpack_cols(self.qzeros, self.bits).t(),
            bits=self.bits,
            group_size=self.group_size,
            g_idx=self.g_idx,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [N, K] weight this layer computes with."""
        return self.quantized_weight().dequantize(dtype or self.scales.dtype)

    def post_load(self) -> None:
        """Called once the buffers hold checkpoint values: drops every form built from earlier ones
        and decides the runtime form for the buffers' device (see the module doc)."""
        self.perm = None
        self._form.invalidate()
        self._place()

    def _place(self) -> None:
        """Decide the runtime form for the device the buffers are on: on CUDA the kernels' layout,
        on CPU the CPU backend's form; nothing on meta (an offloaded layer, whose buffers are put
        in before each call)."""
        form = self._form
        form.cpu = None
        form.version += 1
        device = self.qweight.device
        if device.type == "meta":
            form.kernel_ready = False
        elif device.type == "cpu":
            form.cpu = self._prepare_cpu(form.act_dtype or self.scales.dtype)
        else:
            self._prepare_kernel_layout()

    @property
    def cpu_state(self):
        """The CPU backend's form (llmq.kernels.CpuState) built for the present buffers, or None."""
        return self._form.cpu

    def set_cpu_backend(self, backend: str = "auto", prefill_dense: bool = False) -> None:
        self.cpu_backend = backend
        self.cpu_prefill_dense = prefill_dense
        if self._form.cpu is not None:  # placed on CPU: decided again for the new backend
            self._form.cpu = self._prepare_cpu(self._form.cpu.dtype)
            self._form.version += 1  # forms built from the old one (modules/siblings.py) are stale

    def form_version(self) -> int:
        """The runtime form's version, after dropping the form if a buffer was written in place since
        it was built (what forms built from several layers key on)."""
        form = self._form
        if form.built_from is not None and form.built_from != buffer_versions(self._buffers):
            form.invalidate()
        return form.version

    def _prepare_cpu(self, dtype: torch.dtype):
        self._form.built_from = buffer_versions(self._buffers)
        return prepare_cpu(self.checkpoint_qweight(), self.qzeros, self.scales, self.g_idx, self.bits,
                           self.group_size, dtype, backend=self.cpu_backend, prefill_dense=self.cpu_prefill_dense)

    def _cpu_form(self, dtype: torch.dtype):
        self.form_version()
        state = self._form.cpu
        # None: buffers filled in place without post_load(), written in place or put in since
        # (an offloading hook); a dense weight is kept in the activation dtype.
        if state is None or (state.backend == "dense" and state.dtype != dtype):
            self._form.act_dtype = dtype
            state = self._form.cpu = self._prepare_cpu(dtype)
        return state

    def _prepare_kernel_layout(self) -> None:
        """Decide the kernels' layout: sort qweight's rows by group in place (act_order "reorder")
        unless they are sorted already (perm set: moved codes keep their layout)."""
        if self.act_order not in ("reorder", "gather"):
            raise ValueError(f"act_order must be 'reorder' or 'gather', got {self.act_order!r}")
        if self.perm is None and self.g_idx is not None and self.act_order == "reorder":
            sorted_form = reorder_act_order(self.qweight, self.g_idx, bits=self.bits, group_size=self.group_size)
            if sorted_form is not None and sorted_form[1] is not None:
                self.qweight.copy_(sorted_form[0])
                self.perm = sorted_form[1].to(torch.int32)
        self._form.kernel_ready = True
        self._form.built_from = buffer_versions(self._buffers)

    def _apply(self, fn, recurse=True):
        before = [self._buffers.get(name) for name in CHECKPOINT_BUFFERS]
        placed = self._form.kernel_ready or self._form.cpu is not None
        self._buffers.quiet = True
        try:
            moved = super()._apply(fn, recurse)
        finally:
            self._buffers.quiet = False
        if any(old is not self._buffers.get(name) for old, name in zip(before, CHECKPOINT_BUFFERS)):
            # New tensors (moved, cast): the codes keep their layout; the form follows the device.
            self._form.version += 1
            if placed:
                self._place()
        return moved

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):
        loading = any(prefix + name in state_dict for name in CHECKPOINT_BUFFERS)
        if prefix + "qweight" in state_dict:
            self.perm = None  # checkpoint-layout codes are copied over the sorted ones
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        if prefix + "perm" in missing_keys:  # the layer's own sort order: no state dict holds it
            missing_keys.remove(prefix + "perm")
        if loading:
            self._form.invalidate()
            self._place()

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward through llmq.kernels.dequant_matmul (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
        if wants_input_gradient(x):
            return with_input_gradient(self, x, QuantLinear.kernel_forward)
        if not self._form.kernel_ready:  # not placed on a CUDA device (the interpreter), or buffers put in since
            if torch.compiler.is_compiling():  # rewrite the buffers eagerly, outside the graph
                _kernel_layout_outside_graph(self)
            else:
                self._prepare_kernel_layout()
        g_idx = self.g_idx
        if self.perm is not None:
            x, g_idx = x.index_select(-1, self.perm), None
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return dequant_matmul(x, self.qweight, self.qzeros, self.scales.to(x.dtype), bits=self.bits,
                              group_size=self.group_size, g_idx=g_idx, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return self.cpu_forward(x)
        return self.kernel_forward(x)

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of a CPU input (what `forward` runs on CPU; callers that own the layer's
        calls, such as QuantExperts, call it directly to skip the module call's overhead)."""
        if wants_input_gradient(x):
            return with_input_gradient(self, x, QuantLinear.cpu_forward)
        compiling = torch.compiler.is_compiling()
        siblings = self.__dict__.get("_siblings")  # linears reading the same input (modules/siblings.py)
        if siblings is not None and not compiling:
            y = siblings.output(self, x)
            if y is not None:
                return y
        bias = self._parameters["bias"]  # the table, not nn.Module's slower attribute lookup
        if bias is not None:
            bias = bias.to(x.dtype)
        # Under torch.compile the form is looked up eagerly: building it (when the buffers
        # were put in since) cannot be traced, and tracing it would recompile for every
        # layer shape.
        prepare = _cpu_form_outside_graph if compiling else QuantLinear._cpu_form
        return cpu_matmul(x, prepare(self, x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, desc_act={self.desc_act}, bias={self.bias is not None}")


# torch._disable_dynamo imports dynamo on first call only, so importing llmq stays light.
_cpu_form_outside_graph = torch._disable_dynamo(QuantLinear._cpu_form)
_kernel_layout_outside_graph = torch._disable_dynamo(QuantLinear._prepare_kernel_layout)


def _checkpoint_layout_in_state_dict(module, state_dict, prefix, local_metadata) -> None:
    # The state dict (and so every save) holds the checkpoint layout, never the sorted one.
    if module.perm is not None and prefix + "qweight" in state_dict:
        state_dict[prefix + "qweight"] = module.checkpoint_qweight()
    state_dict.pop(prefix + "perm", None)


def set_cpu_backend(model: nn.Module, backend: str = "auto", prefill_dense: bool = False) -> None:
    """Choose the CPU backend of every QuantLinear in model (see the module doc)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_cpu_backend(backend, prefill_dense)
