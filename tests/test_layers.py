"""The package's shape: layers import only downward, modules form no import cycle, none grows past ~400 lines, and
public functions take at most two positional arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import driftmerge

PACKAGE = Path(driftmerge.__file__).parent
# lowest first: a module may import from its own layer and the ones before it (docs/design.md §4)
LAYERS = ("errors", "progress", "schema", "core", "hub", "io", "evaluation", "reports", "commands", "integrations")
MAX_LINES = 400
MAX_POSITIONAL = 2  # after these, a public function's parameters are keyword-only (a bare ``*``)
# Public functions whose callers, outside driftmerge's control, pass more than two arguments by position. Dunder
# methods are exempt by rule (Python and libraries call them positionally, e.g. transformers calls the
# LogitsProcessor ``LogitExtrapolation.__call__(input_ids, scores)``), so they need no entry here.
_REWARD = "a verifiable reward: user code and sweep's scoring call reward(prompt, completion, answer)"
_HOOK = "a transformers TrainerCallback hook: the Trainer calls it as hook(args, state, control, **kwargs)"
POSITIONAL_BY_PROTOCOL = {
    "driftmerge.evaluation.rewards:exact_number": _REWARD,
    "driftmerge.evaluation.rewards:boxed": _REWARD,
    "driftmerge.integrations.trl:DriftExtrapolationCallback.on_train_begin": _HOOK,
    "driftmerge.integrations.trl:DriftExtrapolationCallback.on_step_end": _HOOK,
    "driftmerge.integrations.trl:DriftExtrapolationCallback.on_log": _HOOK,
    "driftmerge.integrations.trl:DriftExtrapolationCallback.on_save": _HOOK,
}


def _modules() -> dict[str, Path]:
    return {
        "driftmerge." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    """Every ``driftmerge.*`` module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("driftmerge."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("driftmerge.")}
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_only_downward():
    upward = []
    for module, path in _modules().items():
        mine = _layer(module)
        for target in _imports(path):
            theirs = _layer(target)
            if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for t in _imports(p) if t in modules} for m, p in modules.items()}
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    assert cycles == []


def test_no_module_is_long():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


class _Functions(ast.NodeVisitor):
    """Every function and method of a module, nested ones too, as ``(qualified.name, node)``."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.found.append((".".join([*self.scope, node.name]), node))
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef


def test_public_functions_take_keyword_arguments_after_the_first_two():
    """``f(a, b, *, c, d)``: past two, arguments are named at the call, so a reordered or added parameter cannot
    silently take another's value. Private (``_x``) and dunder functions are exempt; see POSITIONAL_BY_PROTOCOL."""
    offenders = {}
    for module, path in _modules().items():
        functions = _Functions()
        functions.visit(ast.parse(path.read_text(encoding="utf-8")))
        for name, fn in functions.found:
            if fn.name.startswith("_"):
                continue
            positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                offenders[f"{module}:{name}"] = f"({', '.join(positional)}) at {path.name}:{fn.lineno}"
    new = {k: v for k, v in offenders.items() if k not in POSITIONAL_BY_PROTOCOL}
    assert new == {}, "put a bare * after the first two parameters (and name the rest at every call site)"
    stale = sorted(POSITIONAL_BY_PROTOCOL.keys() - offenders.keys())
    assert stale == [], "no longer take more than two positional parameters: drop them from POSITIONAL_BY_PROTOCOL"


def test_the_package_exports_its_entry_points_lazily():
    import subprocess
    import sys

    code = (
        "import sys, driftmerge; light = 'torch' not in sys.modules; "
        "from driftmerge import ApplyOptions, ExtractOptions, apply_drift, extract; "
        "from driftmerge.commands.apply import apply_drift as a; from driftmerge.commands.extract import extract as e; "
        "print(light, a is apply_drift, e is extract, ApplyOptions(scale=1.5).scale, ExtractOptions().rank)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "1.5", "1"]
