"""The house's rules, read from the source (AST, not grep): which room may import what, and how
long a function or a module may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BOT = Path(__file__).resolve().parent.parent / "bot"
# merge/ and evaluate/ take local paths and loaded prompt sets: no Hub, no local hub, no zoo
PURE_STAGES = ("merge", "evaluate")
NOT_IN_PURE_STAGES = ("bot.hub", "bot.localhub", "bot.zoo", "huggingface_hub")
NOT_IN_PIPELINE = ("bot.localhub",)
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def module_name(path: Path) -> str:
    """bot/merge/engine.py -> bot.merge.engine; bot/merge/__init__.py -> bot.merge."""
    parts = path.relative_to(BOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (inside functions too), as absolute names;
    `from bot import hub` counts as bot.hub, `from ..hub import x` as bot.hub."""
    package = module_name(path) if path.name == "__init__.py" else \
        module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def offending(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


def sources(*folders: str) -> list[Path]:
    roots = [BOT / f for f in folders] if folders else [BOT]
    return sorted(p for root in roots for p in root.rglob("*.py"))


@pytest.mark.parametrize("path", sources(*PURE_STAGES), ids=lambda p: str(p.relative_to(BOT)))
def test_merge_and_evaluate_import_no_hub_and_no_zoo(path):
    assert offending(imported(path), NOT_IN_PURE_STAGES) == []


def test_the_pipeline_does_not_import_the_local_hub():
    assert offending(imported(BOT / "pipeline.py"), NOT_IN_PIPELINE) == []


def test_the_import_check_sees_every_form(tmp_path, monkeypatch):
    """Relative imports, `from bot import hub` and imports inside functions are all caught."""
    folder = tmp_path / "bot" / "evaluate"
    folder.mkdir(parents=True)
    (folder / "probe.py").write_text(
        "from bot import hub\nfrom .. import zoo\nfrom ..localhub import LocalHub\n"
        "def f():\n    import huggingface_hub.constants\n")
    monkeypatch.setitem(globals(), "BOT", tmp_path / "bot")
    assert offending(imported(folder / "probe.py"), NOT_IN_PURE_STAGES) == [
        "bot.hub", "bot.localhub", "bot.localhub.LocalHub", "bot.zoo",
        "huggingface_hub.constants"]


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(BOT.parent)}:{node.lineno} {node.name} "
                                f"({lines} lines)")
    assert long == []


def test_no_module_is_longer_than_500_lines():
    long = [f"{path.relative_to(BOT.parent)} ({n} lines)" for path in sources()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert long == []
