"""Evaluation: perplexity (GPTQ protocol) and KL divergence / top-1 agreement
against a reference model, several models side by side on identical windows.

    from llmq.eval import eval_windows, perplexity, evaluate
    windows = eval_windows(tokenizer, text, seqlen=2048)          # LongTensor [n, seqlen]
    perplexity(model, windows).perplexity                          # one model in memory
    evaluate(["fp_folder", "llmq_checkpoint"], dataset="wikitext2")  # dict, as `llmq eval --json`
"""

from .evaluate import evaluate, versions
from .metrics import Stats, perplexity, vocab_size
from .refstore import RefStore
from .report import format_table, plot, protocol_line, write_json
from .windows import cut_windows, eval_text, eval_windows

__all__ = ["evaluate", "perplexity", "eval_windows", "cut_windows", "eval_text", "Stats", "RefStore",
           "vocab_size", "format_table", "protocol_line", "write_json", "plot", "versions"]
