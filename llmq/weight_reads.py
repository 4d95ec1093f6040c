"""The linears whose `.weight` a model's own code reads, found in the source of its modules.

A quantized linear holds packed codes, not a `weight`, so a module that reads a child linear's weight
directly (a dtype to cast to, a matrix for a fused kernel) fails on the quantized model: the run
keeps such linears in full precision instead, and says so. Found by reading the methods of each
module's class (constructors and initializers aside) for `self.<path>.weight`, where <path> names
a linear below the module:

- a read inside `if self.training ...:` is not counted: quantized models run in inference;
- a read inside an `if` whose test reads only the module's own attributes (`self.pretraining_tp >
  1 and self.slow_but_exact`) counts only on the side that this module's values take;
- any other read counts, whether or not its branch runs on this machine: a fused kernel's path
  that runs only on CUDA with an optional package installed still runs for someone.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

# Methods that set weights up rather than compute with them.
_NOT_COMPUTING = frozenset({"__init__", "_init_weights", "reset_parameters", "extra_repr"})
_UNKNOWN = object()


def linears_whose_weight_is_read(root: nn.Module) -> list[str]:
    """Dotted names (relative to root) of the linears below root whose weight a module's code reads."""
    found = []
    for name, module in root.named_modules():
        reads = _reads(type(module))
        if not reads:
            continue
        for path, condition in reads:
            if condition is not None and not _holds(condition, module):
                continue
            try:
                target = module.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(target, nn.Linear):
                found.append(f"{name}.{path}" if name else path)
    return sorted(set(found))


def _holds(condition: tuple[ast.expr, bool], module: nn.Module) -> bool:
    """Whether the read's branch can run: its test, evaluated on the module, takes the read's side
    (unknown counts as yes)."""
    test, side = condition
    value = _evaluate(test, module)
    return value is _UNKNOWN or bool(value) == side


def _evaluate(test: ast.expr, module: nn.Module):
    """The value of an `if` test built from the module's own attributes and constants, else _UNKNOWN."""
    for node in ast.walk(test):
        if isinstance(node, ast.Name) and node.id != "self" or isinstance(node, (ast.Call, ast.Lambda)):
            return _UNKNOWN
    try:
        return eval(compile(ast.Expression(test), "<test>", "eval"), {"__builtins__": {}}, {"self": module})
    except Exception:
        return _UNKNOWN


@functools.cache
def _reads(cls: type) -> tuple[tuple[str, tuple[ast.expr, bool] | None], ...]:
    """(path, condition) of each `self.<path>.weight` in the computing methods of cls and its bases;
    condition: (the innermost `if` test over the module's attributes, the side the read is on), or None."""
    reads = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        for name, function in vars(klass).items():
            if name in _NOT_COMPUTING or not inspect.isfunction(function):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
            except (OSError, TypeError, SyntaxError):
                continue
            _Reads(reads).visit(tree)
    return tuple(reads)


def _is_training(test: ast.expr) -> bool:
    """`self.training`, alone or as a term of an `and`."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return any(_is_training(v) for v in test.values)
    return (isinstance(test, ast.Attribute) and test.attr == "training"
            and isinstance(test.value, ast.Name) and test.value.id == "self")


def _self_path(node: ast.expr) -> str | None:
    """"a.b" for the expression self.a.b, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


class _Reads(ast.NodeVisitor):
    def __init__(self, reads: list):
        self.reads = reads
        self.condition = None

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        outer = self.condition
        for side, body in ((True, node.body), (False, node.orelse)):
            if side and _is_training(node.test):
                continue
            self.condition = (node.test, side)
            for statement in body:
                self.visit(statement)
        self.condition = outer

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr == "weight":
            path = _self_path(node.value)
            if path is not None:
                self.reads.append((path, self.condition))
        self.generic_visit(node)


def linears_read_by_initializer(cls: type) -> frozenset[str]:
    """Attribute names `a` for which the `_init_weights` of cls (a transformers model class) or a base
    reads a child module's weight, `module.a.weight`, or hands `module.a` to a function (ModernBERT's
    `init_weight(module.Wi, ...)`). transformers runs it on every module after loading, so a linear so
    named must have a `weight` there (GPT-BigCode's c_proj, Mamba's out_proj, NanoChat's o_proj)."""
    names = set()
    for klass in cls.__mro__:
        function = vars(klass).get("_init_weights")
        if not inspect.isfunction(function):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError):
            continue
        definition = tree.body[0]
        if not isinstance(definition, ast.FunctionDef) or len(definition.args.args) < 2:
            continue
        module = definition.args.args[1].arg  # _init_weights(self, module)
        for node in ast.walk(tree):
            # module.a.weight; or module.a handed to a function of the initializer's own (a plain name:
            # `init.normal_(module.gate_up_proj)` initializes a parameter, not a linear)
            children = ([node.value] if isinstance(node, ast.Attribute) and node.attr == "weight" else
                        list(node.args) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else [])
            for child in children:
                if (isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name)
                        and child.value.id == module and child.attr not in ("weight", "bias")):
                    names.add(child.attr)
    return frozenset(names)
