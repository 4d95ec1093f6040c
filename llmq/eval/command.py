"""`llmq eval MODEL [MODEL ...]`: perplexity, KL and top-1 agreement side by side."""

from __future__ import annotations

import argparse
import os


DESCRIPTION = (
    "Evaluate models one after another on identical token windows: perplexity (GPTQ protocol: text "
    "tokenised once, non-overlapping windows, tail dropped), and for every model after the first, KL "
    "divergence of its next-token distribution from the first model's and top-1 agreement. Models: hub "
    "ids, full-precision folders, checkpoints llmq reads (llmq, gptq, awq, compressed-tensors: loaded by "
    "llmq), or other quantized formats transformers reads.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("models", metavar="MODEL", nargs="+",
                   help="models to compare; the first is the reference (a hub id at a branch, tag or commit: "
                        "owner/name@REV)")
    p.add_argument("--dataset", default="wikitext2",
                   help="evaluation text: wikitext2 (default; from the hub), builtin (text shipped with llmq, "
                        "works offline), a local .txt/.jsonl/.json/.parquet file or a folder of .txt files, c4, "
                        "pileval, or hf:owner/name[:config][:split][:column]")
    p.add_argument("--split", default=None, help="split of a hub dataset (default: test for wikitext2, "
                                                  "validation for c4 and pileval)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: up to 8, keeping fp32 logits under 1 GiB)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype to load models in")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id, owner/name@REV at a version (default: the reference's)")
    p.add_argument("--no-kl", dest="kl", action="store_false",
                   help="perplexity only: skip KL / top-1 and the reference log-probs on disk")
    p.add_argument("--kl-dtype", default="float16", choices=["float16", "float32"],
                   help="storage of the reference log-probs (disk: tokens scored x vocab x 2 or 4 bytes)")
    p.add_argument("--tmp-dir", default=None, help="folder for the reference log-probs (default: system temp)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write every figure and the protocol as JSON (into an existing folder)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="draw perplexity and size per model; the extension names the format: .png, .pdf, .svg ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args, models=None, names=None) -> int:
    """Evaluate args.models (or `models`, e.g. with in-memory factories, named
    `names`), print the table, write --json / --plot."""
    from ..loading import check_source, split_revision
    from .evaluate import evaluate
    from .report import check_output_file, check_plot_file, format_table, plot, write_json

    # Fail before the long run, not after it.
    if args.json:
        check_output_file(args.json, "--json")
    if args.plot:
        check_plot_file(args.plot)
    models = models if models is not None else args.models
    for source in models:  # a mistyped last model fails now, not after the others were scored
        if isinstance(source, (str, os.PathLike)):
            name, revision = split_revision(source)
            check_source(name, revision=revision)
    result = evaluate(models, names=names, dataset=args.dataset, split=args.split, seqlen=args.seqlen,
                      max_windows=args.max_windows, device=args.device, dtype=args.dtype,
                      batch_size=args.batch_size, tokenizer=args.tokenizer, kl=args.kl,
                      kl_dtype=args.kl_dtype, tmp_dir=args.tmp_dir, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0
