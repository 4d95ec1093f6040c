"""Compile llmq's Triton kernels ahead of time for NVIDIA GPUs, without a GPU.

Triton's own compiler and the ptxas shipped with the triton wheel turn every
kernel specialization into a cubin for the chosen architectures. This catches
what the interpreter (TRITON_INTERPRET=1, the CPU tests) cannot: code that
does not lower to real GPU instructions, and tiles whose shared memory does
not fit the device. For each compiled kernel it prints the resources ptxas
assigned (registers, stack, spill memory, shared memory) and the tensor-core
instructions used.

Specializations: every autotune config of each path (split-K decode, tiled
GEMM, dequantize), for each bit width, act-order or not, activation dtype, and
bias or not; the same for the W8A8 int8 kernels (split-K, GEMM, per-token
scales), static activations or dynamic; and the grouped MoE kernels (weight-only
and W8A8) at the tiles they launch with. `--quick` compiles every config once and every specialization
with one config (what the test suite runs).

    python scripts/compile_kernels.py --arch 90 80
    python scripts/compile_kernels.py --quick --arch 90

Exit status 1 when a kernel fails to compile, or when no config of a path fits
an architecture's shared memory. Needs triton with its NVIDIA backend; must
run without TRITON_INTERPRET=1 (the interpreter never compiles).
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Shared memory one block may use (bytes), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
GROUP_SIZES = (128, 32)  # 128: one group per K tile where BLOCK_K divides it; 32: several per tile


@dataclass
class Spec:
    path: str  # splitk | gemm | dequant | gemv
    bits: int
    group_size: int
    act_order: bool
    dtype: str  # torch dtype name of x / the dense weight
    bias: bool

    def label(self) -> str:
        return (f"{self.path} b{self.bits} g{self.group_size} {'act ' if self.act_order else ''}"
                f"{DTYPES[self.dtype]}{' bias' if self.bias else ''}")


def _source(fn, sig: dict, const: dict):
    """The ASTSource of kernel fn: sig gives its runtime arguments' types, const its constexpr values."""
    from triton.compiler import ASTSource

    sig = {**sig, **{name: "constexpr" for name in const}}
    missing = set(fn.arg_names) - set(sig)
    if missing:
        raise RuntimeError(f"{fn.__name__} has arguments this script does not know: {sorted(missing)}")
    constexprs = {(fn.arg_names.index(name),): value for name, value in const.items()}
    return ASTSource(fn, sig, constexprs)


def kernel_source(tq, spec: Spec, config):
    """The ASTSource of one specialization with one config's meta-parameters."""
    t = DTYPES[spec.dtype]
    if spec.path == "dequant":
        fn = tq._dequant_kernel
        sig = {"qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": f"*{t}", "gidx_ptr": "*i32", "w_ptr": f"*{t}",
               "N": "i32", "K": "i32"}
        const = dict(BITS=spec.bits, GROUP_SIZE=spec.group_size, ACT_ORDER=spec.act_order, **config.kwargs)
    elif spec.path == "gemv":
        fn = tq._qgemv_kernel
        sig = {"x_ptr": f"*{t}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": f"*{t}", "gidx_ptr": "*i32",
               "bias_ptr": f"*{t}", "out_ptr": "*fp32", "N": "i32", "K": "i32", "stride_xm": "i32",
               "stride_xk": "i32"}
        const = dict(BITS=spec.bits, GROUP_SIZE=spec.group_size, ACT_ORDER=spec.act_order, HAS_BIAS=spec.bias,
                     **config.kwargs)
    else:
        fn = tq._qmm_kernel
        out = "fp32" if spec.path == "splitk" else t
        sig = {"x_ptr": f"*{t}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": f"*{t}", "gidx_ptr": "*i32",
               "bias_ptr": f"*{t}", "out_ptr": f"*{out}", "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_xk": "i32", "M_BUCKET": "i32"}
        const = dict(BITS=spec.bits, GROUP_SIZE=spec.group_size, ACT_ORDER=spec.act_order, HAS_BIAS=spec.bias,
                     ATOMIC=spec.path == "splitk", DOT_PRECISION=tq._dot_precision(_torch_dtype(spec.dtype)),
                     UPCAST_DOT=False, **config.kwargs)
    return _source(fn, sig, const)


@dataclass
class Int8Spec:
    """One specialization of the W8A8 kernel (llmq.kernels.triton_int8)."""

    path: str  # int8-splitk | int8-gemm | int8-gemv | int8-rowscale | int8-quantize
    dtype: str
    static: bool
    bias: bool

    def label(self) -> str:
        return f"{self.path} {DTYPES[self.dtype]}{' static' if self.static else ''}{' bias' if self.bias else ''}"


def int8_kernel_source(ti, spec: Int8Spec, config):
    t = DTYPES[spec.dtype]
    if spec.path == "int8-rowscale":
        fn = ti._row_scale_kernel
        sig = {"x_ptr": f"*{t}", "xs_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32"}
        const = dict(config.kwargs)
    elif spec.path == "int8-gemv":
        fn = ti._int8_gemv_kernel
        sig = {"q_ptr": "*i8", "w_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
               "out_ptr": "*fp32", "N": "i32", "K": "i32"}
        const = dict(STATIC=spec.static, HAS_BIAS=spec.bias, **config.kwargs)
    elif spec.path == "int8-quantize":
        fn = ti._quantize_rows_kernel
        sig = {"x_ptr": f"*{t}", "q_ptr": "*i8", "xs_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
               "stride_xk": "i32"}
        const = dict(STATIC=spec.static, **config.kwargs)
    else:
        fn = ti._int8_mm_kernel
        splitk = spec.path == "int8-splitk"
        out = "fp32" if splitk else t
        sig = {"x_ptr": f"*{t}" if splitk else "*i8", "w_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
               "out_ptr": f"*{out}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32",
               "M_BUCKET": "i32"}
        const = dict(STATIC=spec.static, HAS_BIAS=spec.bias, ATOMIC=splitk, X_INT8=not splitk, **config.kwargs)
    return _source(fn, sig, const)


def int8_plan(ti, quick: bool):
    import triton

    configs = {"int8-splitk": ti._PATHS.decode_configs, "int8-gemm": ti._PATHS.gemm_configs,
               "int8-gemv": ti._GEMV.configs,
               "int8-rowscale": [triton.Config(dict(BLOCK_K=1024), num_warps=4, num_stages=1)],
               "int8-quantize": [triton.Config(dict(BLOCK_K=1024), num_warps=4, num_stages=1)]}
    specs = [Int8Spec(path, dtype, static, bias)
             for path, dtype, static, bias in itertools.product(configs, DTYPES, (False, True), (True, False))
             if not (path == "int8-rowscale" and (static or bias)) and not (path == "int8-quantize" and bias)]
    if not quick:
        return [(s, c) for s in specs for c in configs[s.path]]
    every_config = [(Int8Spec(path, "float16", False, True), c) for path in configs for c in configs[path]]
    # Quick: each dtype once per path and static/dynamic once per path (the bias branch is the same code).
    few = [s for s in specs if (s.bias or s.path in ("int8-rowscale", "int8-quantize"))
           and (s.dtype != "float16" or s.static)]
    return every_config + [(s, configs[s.path][0]) for s in few]


@dataclass
class MoeSpec:
    """One specialization of the grouped MoE kernels (llmq.kernels.triton_moe), with the tiles the host picks."""

    path: str  # moe-packed | moe-int8
    dtype: str
    block_m: int  # DECODE_BLOCK_M or PREFILL_BLOCK_M
    bits: int = 4  # moe-packed
    group_size: int = 128  # moe-packed
    static: bool = False  # moe-int8

    def label(self) -> str:
        what = f"b{self.bits} g{self.group_size}" if self.path == "moe-packed" else ("static" if self.static else "dyn")
        return f"{self.path} {what} {DTYPES[self.dtype]} m{self.block_m}"


def moe_kernel_source(tm, spec: MoeSpec, config):
    t = DTYPES[spec.dtype]
    tiles = {"slots_ptr": "*i32", "block_expert_ptr": "*i32", "block_start_ptr": "*i32", "block_end_ptr": "*i32"}
    if spec.path == "moe-packed":
        fn = tm._grouped_qmm_kernel
        sig = {"x_ptr": f"*{t}", **tiles, "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": f"*{t}", "bias_ptr": f"*{t}",
               "out_ptr": f"*{t}", "N": "i32", "K": "i32", "stride_xm": "i32"}
        const = dict(BITS=spec.bits, GROUP_SIZE=spec.group_size, HAS_BIAS=True, UPCAST_DOT=spec.dtype == "float32",
                     **config.kwargs)
    else:
        fn = tm._grouped_int8_kernel
        sig = {"x_ptr": f"*{t}" if spec.static else "*i8", "xs_ptr": "*fp32", **tiles, "w_ptr": "*i8",
               "ws_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{t}", "N": "i32", "K": "i32", "stride_xm": "i32"}
        const = dict(STATIC=spec.static, HAS_BIAS=True, **config.kwargs)
    return _source(fn, sig, const)


def moe_plan(tm):
    """The grouped kernels at the tiles grouped_dequant_matmul / grouped_int8_matmul launch on CUDA."""
    import triton

    jobs = []
    for block_m, dtype in itertools.product((tm.DECODE_BLOCK_M, tm.PREFILL_BLOCK_M), DTYPES):
        for bits, gs in itertools.product((4, 8), GROUP_SIZES):
            launch = tm.packed_launch(gs, _torch_dtype(dtype))
            warps = launch.pop("num_warps")
            jobs.append((MoeSpec("moe-packed", dtype, block_m, bits=bits, group_size=gs),
                         triton.Config(dict(BLOCK_M=block_m, **launch), num_warps=warps)))
        launch = tm.int8_launch(block_m)
        warps = launch.pop("num_warps")
        for static in (False, True):
            jobs.append((MoeSpec("moe-int8", dtype, block_m, static=static),
                         triton.Config(dict(BLOCK_M=block_m, **launch), num_warps=warps)))
    return jobs


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, as cuobjdump reports them."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[-1])}


def compile_one(tq, spec, config, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile

    source = (int8_kernel_source(tq, spec, config) if isinstance(spec, Int8Spec)
              else moe_kernel_source(tq, spec, config) if isinstance(spec, MoeSpec) else kernel_source(tq, spec, config))
    kernel = compile(source, target=GPUTarget("cuda", arch, 32),
                     options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    usage = resource_usage(kernel.asm["cubin"])
    mma = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)", kernel.asm["ptx"])))
    return dict(shared=kernel.metadata.shared, regs=usage.get("REG", 0), stack=usage.get("STACK", 0),
                local=usage.get("LOCAL", 0), mma=",".join(mma) or "-")


def path_configs(tq):
    import triton

    dequant = triton.Config(dict(tq._DEQUANT_META), num_warps=4, num_stages=1)
    return {"splitk": tq._PATHS.decode_configs, "gemm": tq._PATHS.gemm_configs, "dequant": [dequant],
            "gemv": tq._GEMV.configs}


def plan(tq, quick: bool):
    """(spec, config) pairs to compile."""
    configs = path_configs(tq)
    specs = [Spec(path, bits, gs, act, dtype, bias)
             for path, bits, gs, act, dtype, bias in itertools.product(
                 configs, (4, 8), GROUP_SIZES, (False, True), DTYPES, (True, False))
             if not (path == "dequant" and bias) and not (act and gs != GROUP_SIZES[0])]
    if not quick:
        return [(s, c) for s in specs for c in configs[s.path]]
    every_config = [(Spec(path, 4, 128, False, "float16", True), c) for path in configs for c in configs[path]]
    every_spec = [(s, configs[s.path][0]) for s in specs if s.bias or s.path == "dequant"]
    return every_config + every_spec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", type=int, default=[90, 80], help="compute capabilities, e.g. 90 80")
    p.add_argument("--quick", action="store_true", help="each config once, each specialization once")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import llmq.kernels.triton_int8 as ti
    import llmq.kernels.triton_moe as tm
    import llmq.kernels.triton_qmm as tq

    if tq.INTERPRET:
        print("compile_kernels: TRITON_INTERPRET=1 is set; the interpreter compiles nothing. Unset it.")
        return 1
    failures = 0
    for arch in args.arch:
        limit = SHARED_LIMIT.get(arch, 99 * 1024)
        fits: dict[str, int] = {}
        print(f"sm_{arch} (shared memory limit {limit} bytes)")
        print(f"  {'kernel':<34} {'config':<44} {'regs':>4} {'stack':>5} {'spill':>5} {'shared':>7}  mma")
        jobs = [(tq, spec, config) for spec, config in plan(tq, args.quick)]
        jobs += [(ti, spec, config) for spec, config in int8_plan(ti, args.quick)]
        jobs += [(tm, spec, config) for spec, config in moe_plan(tm)]
        for module, spec, config in jobs:
            meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items() if k != "GROUP_M")
            meta += f" w{config.num_warps} s{config.num_stages}"
            try:
                r = compile_one(module, spec, config, arch)
            except Exception as e:  # report every failure, then exit 1
                failures += 1
                print(f"  {spec.label():<34} {meta:<44} FAILED: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            ok = r["shared"] <= limit
            fits[spec.path] = fits.get(spec.path, 0) + ok
            print(f"  {spec.label():<34} {meta:<44} {r['regs']:>4} {r['stack']:>5} {r['local']:>5} "
                  f"{r['shared']:>7}  {r['mma']}{'' if ok else '  (exceeds shared memory: pruned)'}", flush=True)
        for path, n in fits.items():
            if n == 0:
                failures += 1
                print(f"  no {path} config fits sm_{arch}'s shared memory")
    print("FAILED" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
