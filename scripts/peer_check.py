#!/usr/bin/env python
"""Peer clients as judges: GPTQModel loads llmq's gptq exports; llmq loads GPTQModel's and llm-compressor's checkpoints.

    PYTHONPATH=. python scripts/peer_check.py [--work DIR] [--json out.json] [--quick]

Needs `gptqmodel` importable (its CPU torch kernel); llm-compressor is checked
when `llmcompressor` is importable too. README ("Checked by peer clients") says
how both were installed here without touching torch or transformers.
Everything runs on the CPU with a tiny Llama built from a config (2 layers,
hidden 64, vocab 256, float16: GPTQModel's torch kernel computes in fp16/bf16
only) and a word-level tokenizer over its 256 ids; nothing is downloaded.

1. llmq -> GPTQModel. llmq quantizes the tiny model and exports `--format gptq`:
   symmetric RTN (v1), asymmetric RTN (gptq_v2), GPTQ with act-order (v1, a
   permuted g_idx). GPTQModel loads each folder (BACKEND.TORCH); its logits on
   fixed tokens are compared with llmq's own (llmq.from_pretrained).
2. GPTQModel -> llmq. GPTQModel quantizes the same model (GPTQ; act-order
   symmetric, and asymmetric) and saves it; llmq.from_pretrained and `llmq
   convert` + llmq.from_pretrained must give GPTQModel's own logits, and `llmq
   info` must report its bits, group size, symmetry, act-order and layer count.
3. llm-compressor -> llmq. llm-compressor's oneshot GPTQ (W4A16 asymmetric
   g32, W8A16 symmetric per channel) saved as compressed-tensors; the judge is
   llm-compressor's own quantized model in memory, checked as in 2.

llmq's logits are taken twice: with exact weights computed densely in fp16
(what the peers do), and with llmq's CPU int kernels, which compute in
bfloat16. Neither is bit-equal to a peer's kernel, so each comparison reports
all sides' distance to a float32 reference built from llmq's dequantized
weights, and passes within TOLERANCE (dense) and KERNEL_TOLERANCE (kernels)
of the largest reference logit. A control shows that a decoding mistake is far
outside that: a v1 folder relabelled gptq_v2 (every zero point off by one)
must fail the comparison.

Exit status 0 when every check passes, 1 when one fails, 2 when gptqmodel is
not importable.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import llmq
from llmq import QuantConfig, QuantLinear
from llmq.formats.convert import convert

# Relative to the largest |logit| of the float32 reference. llmq's dense CPU path and the peers compute in
# fp16 from the same exact weights (bit-equal logits with GPTQModel 7.7 and llm-compressor 0.14 here);
# llmq's int4/int8 CPU kernels compute in bfloat16 (llmq/kernels/cpu.py), about 1e-2 off here. A zero
# point off by one moves the logits by about 2.
TOLERANCE = 1e-3
KERNEL_TOLERANCE = 3e-2
VOCAB = 256


def tiny_llama(seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)  # spread the weights so that quantization error is visible
    return model.half().eval()


def word_tokenizer():
    """A word-level tokenizer whose ids are the tiny model's: token 'w<i>' is id i (GPTQModel needs one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")


def token_windows(n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


IDS = token_windows(2, 16, seed=1)  # the fixed tokens every model is scored on


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(model.device)).logits.float().cpu()


def llmq_logits(folder: Path, dtype=torch.float16, backend: str = "dense") -> torch.Tensor:
    """llmq.from_pretrained's logits; backend "dense" (exact weights, computed in dtype) or "auto" (CPU kernels)."""
    old = QuantLinear.default_cpu_backend
    QuantLinear.default_cpu_backend = backend
    try:
        return logits(llmq.from_pretrained(folder, dtype=dtype))
    finally:
        QuantLinear.default_cpu_backend = old


def reference_logits(folder: Path) -> torch.Tensor:
    """float32 logits from llmq's dequantized weights, computed densely (no int kernel)."""
    return llmq_logits(folder, torch.float32)


def gptqmodel_load(folder: Path):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model


def compare(name: str, peer: torch.Tensor, folder: Path) -> dict:
    """peer's logits against llmq's own load of folder (dense fp16 and llmq's CPU kernels)."""
    ref, ours, kernel = reference_logits(folder), llmq_logits(folder), llmq_logits(folder, backend="auto")
    scale = float(ref.abs().max())
    row = {"check": name, "max_abs_logit": scale, "peer_vs_llmq": float((peer - ours).abs().max()),
           "peer_vs_llmq_kernel": float((peer - kernel).abs().max()),
           "peer_vs_ref32": float((peer - ref).abs().max()), "llmq_vs_ref32": float((ours - ref).abs().max()),
           "llmq_kernel_vs_ref32": float((kernel - ref).abs().max())}
    row["ok"] = row["peer_vs_llmq"] <= TOLERANCE * scale and row["peer_vs_llmq_kernel"] <= KERNEL_TOLERANCE * scale
    return row


def llmq_exports_in_gptqmodel(work: Path, fp_dir: Path) -> list[dict]:
    cases = {
        "llmq gptq v1 (sym, rtn g32) -> GPTQModel": QuantConfig(method="rtn", bits=4, group_size=32, sym=True),
        "llmq gptq_v2 (asym, rtn g32) -> GPTQModel": QuantConfig(method="rtn", bits=4, group_size=32, sym=False),
        "llmq gptq v1 (sym, gptq act-order g32) -> GPTQModel": QuantConfig(method="gptq", bits=4, group_size=32,
                                                                            sym=True, desc_act=True),
    }
    rows = []
    tokenizer = word_tokenizer()
    for i, (name, qc) in enumerate(cases.items()):
        model = llmq.quantize(str(fp_dir), qc, dataset=token_windows(16, 64, seed=2), progress=False)
        native, out = work / f"llmq-{i}-native", work / f"llmq-{i}-gptq"
        llmq.save(model, native, tokenizer=tokenizer, overwrite=True)
        convert(native, out, "gptq", overwrite=True)
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        peer_model = gptqmodel_load(out)
        kernel = sorted({type(m).__name__ for m in peer_model.modules() if hasattr(m, "qweight")})
        row = compare(name, logits(peer_model), out)
        row.update(checkpoint_format=cfg["checkpoint_format"], desc_act=cfg["desc_act"], peer_kernel=kernel)
        rows.append(row)
    # A decoding mistake must show: the symmetric v1 folder relabelled gptq_v2 makes GPTQModel read every
    # stored zero point (z - 1) as the true one, an off-by-one the comparison has to catch.
    import shutil

    wrong = work / "llmq-mislabelled"
    shutil.rmtree(wrong, ignore_errors=True)
    shutil.copytree(work / "llmq-0-gptq", wrong)
    for f in ("config.json", "quantize_config.json"):
        cfg = json.loads((wrong / f).read_text())
        (cfg.get("quantization_config") or cfg)["checkpoint_format"] = "gptq_v2"
        (wrong / f).write_text(json.dumps(cfg))
    row = compare("control: v1 folder mislabelled gptq_v2 -> GPTQModel (must differ)",
                  logits(gptqmodel_load(wrong)), work / "llmq-0-gptq")
    row["ok"] = not row["ok"]
    rows.append(row)
    return rows


def gptqmodel_checkpoints_in_llmq(work: Path, fp_dir: Path, quick: bool) -> list[dict]:
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)}
                   for w in token_windows(8 if quick else 16, 64, seed=3)]
    cases = {"GPTQModel gptq (sym, act-order g32) -> llmq": dict(bits=4, group_size=32, sym=True, desc_act=True),
             "GPTQModel gptq (asym g32) -> llmq": dict(bits=4, group_size=32, sym=False, desc_act=False)}
    rows = []
    for i, (name, settings) in enumerate(cases.items()):
        out = work / f"gptqmodel-{i}"
        peer = GPTQModel.load(str(fp_dir), QuantizeConfig(**settings), device="cpu", dtype=torch.float16)
        t0 = time.perf_counter()
        peer.quantize(calibration, backend=BACKEND.TORCH)
        seconds = time.perf_counter() - t0
        peer.save(str(out))
        del peer
        row = _peer_checkpoint_rows(name, logits(gptqmodel_load(out)), out, work / f"gptqmodel-{i}-native",
                                    dict(settings, format="gptq"))
        row[0]["peer_quantize_s"] = round(seconds, 1)
        rows += row
    return rows


def _peer_checkpoint_rows(name: str, peer_logits: torch.Tensor, out: Path, native: Path, want: dict) -> list[dict]:
    """A peer's checkpoint in llmq: from_pretrained, `llmq convert` + from_pretrained, and `llmq info`."""
    from llmq.info import checkpoint_info

    rows = [compare(name + " (from_pretrained)", peer_logits, out)]
    convert(out, native, "llmq", overwrite=True)
    rows.append(compare(name + " (llmq convert)", peer_logits, native))
    info = checkpoint_info(out)
    want = dict(want, quantized_layers=14)
    got = {k: info[k] for k in want}
    rows.append({"check": name + " (llmq info)", "ok": got == want, "info": got, "expected": want})
    return rows


def llmcompressor_checkpoints_in_llmq(work: Path, fp_dir: Path) -> list[dict]:
    """llm-compressor's GPTQ (compressed-tensors pack-quantized) in llmq; its own fake-quantized run is the judge."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    windows = token_windows(16, 64, seed=3)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    cases = {"llm-compressor W4A16 (asym g32) -> llmq": dict(bits=4, group_size=32, sym=False, desc_act=False),
             "llm-compressor W8A16 (sym channel) -> llmq": dict(bits=8, group_size=-1, sym=True, desc_act=False)}
    rows = []
    for i, (name, settings) in enumerate(cases.items()):
        weights = QuantizationArgs(num_bits=settings["bits"], type="int", symmetric=settings["sym"],
                                   strategy="channel" if settings["group_size"] == -1 else "group",
                                   group_size=None if settings["group_size"] == -1 else settings["group_size"])
        recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                              ignore=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float16)
        t0 = time.perf_counter()
        oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=64, num_calibration_samples=len(windows))
        seconds = time.perf_counter() - t0
        peer_logits = logits(model)  # the quantized model as llm-compressor runs it (fake-quantized weights)
        out = work / f"llmcompressor-{i}"
        model.save_pretrained(out, save_compressed=True)
        row = _peer_checkpoint_rows(name, peer_logits, out, work / f"llmcompressor-{i}-native",
                                    dict(settings, format="compressed-tensors"))
        row[0]["peer_quantize_s"] = round(seconds, 1)
        rows += row
    return rows


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for pkg in ("llmq", "gptqmodel", "torch", "transformers", "compressed-tensors", "llmcompressor"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run(work: Path, quick: bool = False) -> dict:
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fp_dir = work / "fp"
    tiny_llama().save_pretrained(fp_dir)
    word_tokenizer().save_pretrained(fp_dir)
    # GPTQModel sizes its CPU worker pool to half the cores and then asks for two loader threads: on a
    # 2-core machine that is refused ("requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    cwd = os.getcwd()
    os.chdir(work)  # GPTQModel writes its logs under the working folder
    try:
        rows = llmq_exports_in_gptqmodel(work, fp_dir) + gptqmodel_checkpoints_in_llmq(work, fp_dir, quick)
        skipped = {}
        try:
            import llmcompressor  # noqa: F401
        except ImportError as e:
            skipped["llmcompressor"] = f"not importable: {e}"
        else:
            rows += llmcompressor_checkpoints_in_llmq(work, fp_dir)
    finally:
        os.chdir(cwd)
    return {"versions": versions(), "tokens": list(IDS.shape), "skipped": skipped, "checks": rows,
            "tolerance": f"|peer - llmq dense fp16| <= {TOLERANCE} x max|ref32 logit|, "
                         f"|peer - llmq CPU kernel (bf16)| <= {KERNEL_TOLERANCE} x max|ref32 logit|"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="peer-check-work", help="folder for the checkpoints (reused, overwritten)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="fewer calibration windows for GPTQModel")
    args = p.parse_args()
    try:
        import gptqmodel  # noqa: F401
    except ImportError as e:
        print(f"peer_check: gptqmodel is not importable ({e}); see README for how it was installed", file=sys.stderr)
        return 2
    result = run(Path(args.work), args.quick)
    print(json.dumps(result["versions"]))
    print(f"logits on {result['tokens']} fixed tokens; pass: {result['tolerance']}")
    for r in result["checks"]:
        if "peer_vs_llmq" in r:
            print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']}: |peer-llmq| {r['peer_vs_llmq']:.2e}, "
                  f"|peer-llmq kernel| {r['peer_vs_llmq_kernel']:.2e} (peer-ref32 {r['peer_vs_ref32']:.2e}, "
                  f"llmq-ref32 {r['llmq_vs_ref32']:.2e}, llmq kernel-ref32 {r['llmq_kernel_vs_ref32']:.2e}, "
                  f"max|logit| {r['max_abs_logit']:.2f})")
        else:
            print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check']}: {r['info']}")
    for peer, why in result["skipped"].items():
        print(f"SKIP  {peer}: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] for r in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
