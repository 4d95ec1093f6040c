"""How the Triton GEMM kernels are launched: interpreter or GPU, the M buckets of
their autotune keys, the order of their output tiles, and the configurations of
their two paths and of the GEMV kernels (`tuned_gemv`: one row per program, no
tl.dot, split-K atomics; forced-only until a GPU has timed them).

Each GEMM kernel (triton_qmm's dequantize-matmul, triton_int8's int8 GEMM)
runs one of two paths:
- decode: 16-row tiles (the smallest tl.dot tile; decode is bound by weight
  bytes, so the padded rows cost little), SPLIT_K programs adding into an fp32
  output with atomics, which trades the atomics for SM occupancy;
- gemm: one program per output tile.

On CUDA each path is autotuned over its own tiles, the key bucketed on M (next
power of two, capped) so that one tuning serves nearby M. Under
TRITON_INTERPRET=1 (CPU tests) the autotuner cannot benchmark several configs,
so each path runs one fixed small config, the decode one still with SPLIT_K > 1
so that the atomic reduction is exercised. The choice is made once, when this
module is imported, by reading os.environ (nothing is set here).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# M buckets share one autotune result; beyond the cap all M tune alike. At a cap of 256 the
# int8 GEMM ran 4096-row prefills with the tile tuned for 256 rows (64 x 64 on two of Llama-3.1-8B's
# linears, 0.91-1.01x cuBLAS fp16 on an H200, against 1.71x where 256 rows had chosen 128 x 128:
# BENCHMARKS.md, "On an H200"). Each bucket costs one tuning (about a second) per layer shape.
_M_BUCKET_CAP = 4096
_INTERPRET_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GROUP_M=8)
_INTERPRET_GEMV = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)
_INTERPRET_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, GROUP_M=2)


def m_bucket(m: int) -> int:
    """The autotune key's stand-in for M."""
    return min(triton.next_power_of_2(max(m, 1)), _M_BUCKET_CAP)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in the grouped launch order: GROUP_M row tiles walk
    the columns together, so the weight tiles they share are still in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % band) % rows_in_band, (pid % band) // rows_in_band


def tile_grid(m: int, n: int):
    """The launch grid of the decode and gemm paths: one program per output tile (ordered by
    grouped_tile) times SPLIT_K."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def gemv_grid(m: int, n: int):
    """The launch grid of a GEMV kernel: column tiles, SPLIT_K, and one program row per row of x."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)


def _config(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, GROUP_M=8),
                         num_warps=warps, num_stages=stages)


class TunedPaths(NamedTuple):
    """A kernel's two paths: what to launch and the meta-parameters to pass (none where the
    autotuner picks them), and the configs the autotuner chooses from on CUDA."""

    decode: object
    gemm: object
    decode_meta: dict
    gemm_meta: dict
    decode_configs: list
    gemm_configs: list
    jit: object  # the jit function itself, for pinned()

    def pinned(self, decode: triton.Config, gemm: triton.Config) -> TunedPaths:
        """These paths launching one given config each, with no autotuning: checks of every config,
        and checks across many specializations that would otherwise compile every config of each."""
        return self._replace(decode=self.jit, gemm=self.jit, decode_meta=_launch_meta(decode),
                             gemm_meta=_launch_meta(gemm))


def _launch_meta(config: triton.Config) -> dict:
    """A config as the keyword arguments of a launch of the jit function itself."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def tuned_paths(kernel, key: list[str], decode_tiles, gemm_tiles) -> TunedPaths:
    """decode_tiles: (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) of the 16-row decode tiles;
    gemm_tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    decode_configs = [_config(16, bn, bk, sk, w, s) for bn, bk, sk, w, s in decode_tiles]
    gemm_configs = [_config(bm, bn, bk, 1, w, s) for bm, bn, bk, w, s in gemm_tiles]
    if INTERPRET:
        return TunedPaths(kernel, kernel, _INTERPRET_DECODE, _INTERPRET_GEMM, decode_configs, gemm_configs, kernel)
    # reset_to_zero: autotuning runs the atomic kernel repeatedly on one buffer.
    return TunedPaths(triton.autotune(configs=decode_configs, key=key, reset_to_zero=["out_ptr"])(kernel),
                      triton.autotune(configs=gemm_configs, key=key)(kernel), {}, {}, decode_configs, gemm_configs,
                      kernel)


class TunedGemv(NamedTuple):
    """A GEMV kernel (one row of x per program, no tl.dot): what to launch, its meta-parameters
    (none where the autotuner picks them), its configs on CUDA and the jit function itself."""

    kernel: object
    meta: dict
    configs: list
    jit: object

    def pinned(self, config: triton.Config) -> TunedGemv:
        """This kernel launching `config`, with no autotuning (see TunedPaths.pinned)."""
        return self._replace(kernel=self.jit, meta=_launch_meta(config))


def tuned_gemv(kernel, key: list[str], tiles) -> TunedGemv:
    """tiles: (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages). The programs of one output tile add their
    partial sums with atomics into out_ptr, which autotuning zeroes between its runs."""
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk), num_warps=w, num_stages=s)
               for bn, bk, sk, w, s in tiles]
    if INTERPRET:
        return TunedGemv(kernel, _INTERPRET_GEMV, configs, kernel)
    return TunedGemv(triton.autotune(configs=configs, key=key, reset_to_zero=["out_ptr"])(kernel), {}, configs, kernel)
