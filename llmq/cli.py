"""The `llmq` console script.

    llmq quantize MODEL OUT [--method rtn|gptq|awq] [--bits 4|8] [--group-size N] ...
    llmq info CHECKPOINT

Mistakes a user can fix (LlmqError) print one line and exit with status 2;
argparse's own usage errors exit with 2 as well.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .config import ACT_MODES, ACT_OBSERVERS, DEFAULT_ACT_OBSERVER, METHODS, SCHEMES, QuantConfig
from .data import DEFAULT_CALIBRATION
from .methods import registry
from .errors import LlmqError
from ._version import __version__

# Further subcommands live beside the code they drive: module -> (name, help).
# Each module provides add_arguments(parser) and run(args) -> int.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    ".formats.convert": ("convert", "convert a quantized checkpoint between llmq, gptq, awq (read) and "
                                    "compressed-tensors, without requantizing"),
    ".eval.command": ("eval", "perplexity, KL divergence and top-1 agreement of models side by side"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default where it says something: not for a default of None (the help
    says what then happens) nor for an on/off switch."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a model and write an llmq checkpoint",
        description="Quantize the linear layers of a causal LM (hub id or local folder) and write a "
                    "safetensors checkpoint to OUT that `llmq.from_pretrained` / transformers (after "
                    "`import llmq`) load.",
        formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="hub id (owner/name) or local model folder")
    p.add_argument("out", metavar="OUT", help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="; ".join(f"{m.name}: {m.summary}" for m in registry.entries()))
    p.add_argument("--scheme", choices=SCHEMES, default="weight-only",
                   help="weight-only: int4/int8 weights; w8a8: int8 weights (per output row) and int8 "
                        "activations, run through int8 matmuls")
    p.add_argument("--bits", type=int, default=None, help="bits per weight: 4 or 8 (default 4; w8a8: 8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input features per scale; -1 for one group per output row (default 128; w8a8: -1)")
    p.add_argument("--act", choices=ACT_MODES, default=None,
                   help="w8a8: dynamic (per-token activation scales at run time, default) or static "
                        "(one scale per linear input, fixed on --dataset)")
    p.add_argument("--smooth", default=None, metavar="ALPHA|auto|off",
                   help="w8a8: SmoothQuant migration strength in [0, 1], auto (searched per group) or off "
                        "(default: auto when the run calibrates, i.e. --act static or --method gptq; "
                        "off for data-free dynamic rtn)")
    p.add_argument("--act-observer", choices=ACT_OBSERVERS, default=None,
                   help="w8a8 --act static: how the activation scales are fixed from the calibration data "
                        f"(default: {DEFAULT_ACT_OBSERVER})")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True,
                     help="symmetric (the default): zero point fixed at 2^(bits-1)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric: a zero point per group")
    p.add_argument("--dataset", default=None,
                   help="calibration data (gptq/awq): builtin (a public-domain novel excerpt shipped with "
                        "llmq, works offline), wikitext2, c4, pileval, hf:owner/name[:config][:split]"
                        "[:column], a .txt/.jsonl/.json/.parquet file, a folder of text files, or 'self' "
                        f"(text sampled from the model, works offline); default {DEFAULT_CALIBRATION}, "
                        "except that --act static needs it named")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing activation energy (stores g_idx); on by default for "
                        "--method gptq, except with --format compressed-tensors, which cannot store g_idx")
    p.add_argument("--static-groups", action="store_true",
                   help="GPTQ with --act-order: fix group scales before the solve (contiguous groups)")
    p.add_argument("--damp", type=float, default=None,
                   help=f"GPTQ damping, fraction of the mean Hessian diagonal (default: {QuantConfig.damp})")
    p.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                   help="GPTQ: plain min-max group ranges instead of the shrink search that minimises "
                        "each group's quantization error")
    p.add_argument("--skip", action="append", default=None, metavar="NAME",
                   help="module name (or suffix) to keep in full precision, beside lm_head; repeatable")
    p.add_argument("--moe-calibration", choices=["routed", "all"], default="routed",
                   help="mixture-of-experts, gptq/awq/w8a8: each expert calibrates on the tokens routed to it, or on "
                        "every calibration token (only the routed outputs flow on)")
    p.add_argument("--moe-min-tokens", type=int, default=16,
                   help="experts routed fewer calibration tokens than this are quantized by round-to-nearest "
                        "(w8a8: calibrated on every calibration token instead; reported per layer)")
    p.add_argument("--quantize-routers", dest="keep_routers", action="store_false",
                   help="also quantize MoE routers, where they are linear layers (kept in full precision by "
                        "default; refused where a router is not a linear, as transformers 5's top-k routers)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype to load the model in")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="the version of a hub MODEL to quantize: a branch, tag or commit (default: main)")
    p.add_argument("--format", choices=["llmq", "gptq", "compressed-tensors"], default="llmq",
                   help="checkpoint format: llmq (native), gptq (vLLM/SGLang/TGI/transformers), "
                        "compressed-tensors (vLLM's native format, transformers)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the model from its safetensors shards instead of loading it whole: rtn goes "
                        "straight from the input shards to the output shards, calibrated methods load one "
                        "decoder layer at a time and write it out at once (default: on for rtn where the model "
                        "allows it; for the others when the model would take more than half the available "
                        "host memory)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted streamed run of the same model, data and options into OUT "
                        "from its first unfinished layer (implies --stream)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars, notes or summary; errors only")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args) -> int:
    from .formats.native import save
    from .outdir import check_output_dir, handle_stale_partials
    from .pipeline import quantize

    from . import distributed

    args.device = distributed.setup(args.device)  # under torchrun: join the process group
    if not distributed.is_writer():
        args.quiet = True  # rank 0 speaks for all
    check_output_dir(args.out, args.overwrite, [args.model])  # fail before any expensive work
    if args.revision is not None and os.path.exists(args.model):
        raise LlmqError(f"--revision names a version of a hub model, and {args.model} is a local folder: drop it")
    if args.resume and args.stream is False:
        raise LlmqError("--resume continues a streamed run: drop --no-stream")
    if not args.resume and distributed.is_writer():  # --resume picks its folder among them itself
        handle_stale_partials(args.out, args.overwrite)
    if args.act_order is None and args.format == "compressed-tensors":
        args.act_order = False
    if args.format == "compressed-tensors" and args.act_order and not args.static_groups:
        raise LlmqError("--act-order stores a permuted g_idx, which compressed-tensors cannot hold: use "
                        "--format gptq, add --static-groups, or drop --act-order")
    config = QuantConfig(
        method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
        desc_act=args.act_order, static_groups=args.static_groups, clip_search=args.clip_search,
        damp=QuantConfig.damp if args.damp is None else args.damp,
        modules_to_not_convert=list(dict.fromkeys(["lm_head", *(args.skip or [])])),  # the head is never quantized
        scheme=args.scheme, act=args.act, smooth=args.smooth, act_observer=args.act_observer,
        keep_routers=args.keep_routers, moe_calibration=args.moe_calibration, moe_min_tokens=args.moe_min_tokens,
    )
    if config.quantizes_activations and args.format == "gptq":
        raise LlmqError("--format gptq has no activation scales: write --scheme w8a8 with --format llmq "
                        "or compressed-tensors")
    method = registry.for_config(config)
    method.check_data(config, args.dataset)
    if args.dataset is not None and not method.calibrates(config):
        if not args.quiet:
            use = "--smooth auto or --method gptq" if config.quantizes_activations else "--method gptq or awq"
            print(f"note: --dataset is not read: this run needs no calibration data ({use} calibrates on it)",
                  file=sys.stderr)
        args.dataset = None  # said once, here
    unread = [flag for flag, given in (("--damp", args.damp is not None), ("--no-clip-search", not args.clip_search))
              if given]
    if unread and not registry.runs_gptq(config.method) and not args.quiet:
        print(f"note: {' and '.join(unread)} set GPTQ's solve, which --method {config.method} does not run: "
              "not read", file=sys.stderr)
    from .loading import load_model
    from .memory import peak_host_memory
    from .units import human_bytes

    if distributed.active() and not method.calibrates(config):
        # Without calibration there is nothing to share: rank 0 does it alone, as one process (a streamed
        # run's collectives would wait for ranks that left), and the others stop here.
        writer = distributed.is_writer()
        distributed.teardown()
        if not writer:
            return 0
    report: dict = {}
    out = _quantize_from_shards(args, config, report) if args.stream is not False else None
    if out is not None:
        if not args.quiet and distributed.is_writer():
            from .census import folder_census

            _print_census(folder_census(out, config.bits), report)
            print(f"wrote {out} (peak host memory {human_bytes(peak_host_memory())})")
        return 0
    model, tokenizer = load_model(args.model, args.dtype, args.revision)
    model = quantize(model, config, dataset=args.dataset, tokenizer=tokenizer, device=args.device,
                     nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, progress=not args.quiet,
                     report=report)
    if not distributed.is_writer():
        return 0  # rank 0 reports and writes
    if not args.quiet:
        from .census import model_census

        _print_census(model_census(model, config.bits), report)
    # OUT was checked above; what appeared there since is judged at the final rename, keeping the work.
    if args.format == "llmq":
        out = save(model, args.out, tokenizer, overwrite=args.overwrite, sources=[args.model], check_first=False)
    else:
        from .formats.convert import export, print_report

        rows = export(model, args.out, tokenizer, args.format, overwrite=args.overwrite, check_first=False)
        out = args.out
        if not args.quiet:
            print_report(args.format, rows)
    if not args.quiet:
        print(f"wrote {out} (peak host memory {human_bytes(peak_host_memory())})")
    return 0


def _print_census(census, report: dict) -> None:
    """What was quantized and kept (llmq.census), then the experts' token counts and fallbacks."""
    print("\n".join(census.lines() + report.get("experts", [])))


def _quantize_from_shards(args, config: QuantConfig, report: dict):
    """Quantize reading the model from its shards (rtn: shard by shard; others: streamed layer by
    layer) when that is asked for or needed; None (with a note where it matters) to quantize in memory."""
    from .loading import load_tokenizer
    from .skeleton import build_skeleton
    from .stream import choose_route

    skeleton = build_skeleton(args.model, args.dtype, args.revision)
    route, note = choose_route(skeleton, config, args.format, args.dataset, args.stream, args.resume)
    if note and not args.quiet:
        print(f"note: {note}", file=sys.stderr)
    if route == "memory":
        return None
    tokenizer = load_tokenizer(skeleton.folder)  # a hub model's snapshot folder holds its tokenizer files
    if route == "shards":
        from .shard_rtn import quantize_rtn_shards

        return quantize_rtn_shards(skeleton, args.out, config, device=args.device, tokenizer=tokenizer,
                                   overwrite=args.overwrite, progress=not args.quiet)
    from .stream import quantize_streamed

    return quantize_streamed(skeleton, args.out, config, dataset=args.dataset, tokenizer=tokenizer,
                             device=args.device, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                             overwrite=args.overwrite, progress=not args.quiet, resume=args.resume, report=report)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a quantized checkpoint (llmq, gptq, awq, compressed-tensors)",
                       description="Show what is quantized in a checkpoint, with bits, group size, and its "
                                   "size on disk against the full-precision original, without reading its weights.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from .info import checkpoint_info, format_info

    print(format_info(checkpoint_info(args.checkpoint)))
    return 0


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="llmq", description="Post-training quantization of Hugging Face causal LMs: "
                                     "int4/int8 weights, or int8 weights and activations.")
    parser.add_argument("--version", action="version", version=f"llmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(sub)
    _add_info(sub)
    for module, (name, help_text) in EXTRA_COMMANDS.items():
        mod = importlib.import_module(module, __package__)
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def _quiet() -> None:
    """No progress bars or info lines from transformers and huggingface_hub (loading, saving, downloads)."""
    import huggingface_hub.utils
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _partial_fate(announced: bool) -> str:
    """What became of the output, for the exit line; `announced`: a streamed run not --quiet has
    already said where it keeps its finished layers (llmq.stream), which is not repeated."""
    from .outdir import KEPT, PUBLISHED

    if PUBLISHED:  # interrupted after the output was in place
        return f"; {PUBLISHED[-1]} was written whole before"
    if KEPT:  # a streamed run's finished layers
        return "" if announced else f"; finished layers kept in {KEPT[-1]}: rerun with --resume to continue"
    return "; partial output removed"


def _out_of_space(exc: BaseException) -> bool:
    """A full disk or quota, however the writer reports it (OSError, or safetensors' own error)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__name__ == "SafetensorError" and f"os error {errno.ENOSPC})" in str(exc)


def main(argv: list[str] | None = None) -> int:
    from .outdir import Terminated, cleanup_on_signals, restore_signals

    from .outdir import KEPT, PUBLISHED

    KEPT.clear()  # what this run keeps and writes, not an earlier call's
    PUBLISHED.clear()
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        _quiet()
    announced = not getattr(args, "quiet", False)
    previous = cleanup_on_signals()  # SIGTERM unwinds like Ctrl-C: partial folders and temp stores are removed
    try:
        return args.func(args)
    except LlmqError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmq: interrupted{_partial_fate(announced)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"llmq: terminated{_partial_fate(announced)}", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader of stdout left (`llmq info X | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail too
        return 141
    except Exception as e:
        if not _out_of_space(e):
            raise
        print(f"llmq: error: no space left on the device ({e}): free some or write elsewhere"
              f"{_partial_fate(announced)}", file=sys.stderr)
        return 2
    finally:
        restore_signals(previous)
        from .distributed import teardown

        teardown()


if __name__ == "__main__":
    sys.exit(main())
