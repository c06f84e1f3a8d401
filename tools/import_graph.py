#!/usr/bin/env python3
"""dermnode's import graph, the rules it must follow, and ``docs/architecture.md`` generated from both.

Every ``import`` and ``from ... import`` under ``src/dermnode`` (module level and inside functions alike) is
read with the standard library's :mod:`ast`; nothing is imported or executed. The same walk feeds the mermaid
graph of ``docs/architecture.md`` and ``tests/test_architecture.py``, which fails on a forbidden import.

Usage::

    python tools/import_graph.py           # rewrite docs/architecture.md
    python tools/import_graph.py --check   # exit 1 when a rule is broken or docs/architecture.md is stale
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
TOP = "dermnode"


@dataclass(frozen=True)
class Import:
    """One imported module: ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: Path
    line: int
    function_level: bool

    def where(self, root: Path = ROOT) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}"


@dataclass(frozen=True)
class Rule:
    """Modules under ``sources`` must not import a module under ``forbidden`` (unless it is under ``allowed``).

    ``exempt`` sources are not bound by the rule; in ``function_level_ok`` modules an import inside a function
    (a lazily dispatched command) is allowed.
    """

    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()
    function_level_ok: tuple[str, ...] = ()

    def broken_by(self, imp: Import) -> bool:
        if not under(imp.source, self.sources) or under(imp.source, self.exempt):
            return False
        if not under(imp.target, self.forbidden) or under(imp.target, self.allowed):
            return False
        return not (imp.function_level and under(imp.source, self.function_level_ok))


def under(module: str, prefixes: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _pkg(*names: str) -> tuple[str, ...]:
    return tuple(f"{TOP}.{n}" for n in names)


#: What each package owns (one line each in docs/architecture.md); the top-level modules are listed together.
PACKAGES: dict[str, str] = {
    "dermnode.vocabulary": "the result types and the concepts DICOM and FHIR both code (bands, diagnosis classes, "
    "colours, the procedure)",
    "dermnode.scp": "receiving: the Store SCP and the durable spool",
    "dermnode.workqueue": "the state database, one claim/retry/backoff/dead-letter mechanism for jobs and "
    "deliveries, the worker threads, the durable file write",
    "dermnode.inference": "the runtime analysis: quality gate, artefacts, segmentation, measurements, "
    "classification, overlay, model registry",
    "dermnode.dicom_io": "DICOM in and out: decoding, SEG and SR builders, DICOM codes, C-STORE sender, modality "
    "simulator",
    "dermnode.fhir": "the FHIR DiagnosticReport bundle, FHIR codes, the FHIR REST client",
    "dermnode.training": "training code, data sets, pseudo-labels (never run by the service)",
    "dermnode.evaluation": "metrics and the `dermnode evaluate` evaluators (never run by the service)",
    "dermnode.pipeline": "one job end to end: decode, analyse, write SEG/SR/FHIR/result.json, queue deliveries",
    "dermnode.service": "the running node: lock, SCP, workers, outbox, HTTP health, web console",
    "dermnode.web": "the web console: worklist, result pages, upload into the spool and job queue, status; "
    "sessions, CSRF, audit of results viewed",
    "dermnode.cli": "the `dermnode` command; imports training and evaluation only inside the command that runs "
    "them",
}

RULES: tuple[Rule, ...] = (
    Rule(
        sources=(TOP,),
        forbidden=_pkg("training", "evaluation"),
        exempt=_pkg("training", "evaluation"),
        function_level_ok=_pkg("cli"),
        why="the service never imports research code (cli only inside the command that runs it)",
    ),
    Rule(
        sources=_pkg("vocabulary"),
        forbidden=(TOP,),
        allowed=_pkg("errors"),
        why="the neutral vocabulary depends on nothing of dermnode but errors",
    ),
    Rule(
        sources=_pkg("dicom_io"),
        forbidden=_pkg("fhir", "inference", "scp", "workqueue", "pipeline", "service"),
        why="DICOM output is built from the vocabulary, not from FHIR, the analysis or the runtime",
    ),
    Rule(
        sources=_pkg("fhir"),
        forbidden=_pkg("dicom_io", "inference", "scp", "workqueue", "pipeline", "service"),
        why="FHIR output is built from the vocabulary, not from DICOM, the analysis or the runtime",
    ),
    Rule(
        sources=_pkg("inference"),
        forbidden=_pkg("scp", "workqueue", "dicom_io", "fhir", "pipeline", "service", "delivery"),
        why="the analysis works on pixels and returns vocabulary types; it knows no transport or format",
    ),
    Rule(
        sources=_pkg("scp"),
        forbidden=(*_pkg("inference", "pipeline", "fhir"), f"{TOP}.dicom_io.seg", f"{TOP}.dicom_io.sr"),
        why="receiving stores and queues; it never analyses or builds outputs",
    ),
    Rule(
        sources=_pkg("workqueue"),
        forbidden=_pkg("scp", "inference", "dicom_io", "fhir", "pipeline"),
        why="the queue machinery knows no receiver, analysis or output format",
    ),
    Rule(
        sources=_pkg("web"),
        forbidden=(
            *_pkg("inference", "pipeline", "fhir", "delivery", "service", "cli"),
            f"{TOP}.dicom_io.seg",
            f"{TOP}.dicom_io.sr",
            f"{TOP}.dicom_io.sender",
        ),
        why="the console reads what the runtime wrote and ingests through the spool and job queue; it never "
        "analyses, builds outputs or sends them",
    ),
    Rule(
        sources=(TOP,),
        forbidden=_pkg("web"),
        exempt=_pkg("web", "service", "cli"),
        why="only the service (and the CLI) start the web console; the runtime does not know it",
    ),
)


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str, src: Path) -> bool:
    base = src.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, src: Path, is_package: bool) -> None:
        self.module, self.path, self.src, self.is_package = module, path, src, is_package
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.module, target, self.path, line, self.depth > 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = _function  # noqa: N815
    visit_AsyncFunctionDef = _function  # noqa: N815
    visit_Lambda = _function  # noqa: N815

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        # `from dermnode import vocabulary` imports the module dermnode.vocabulary; `from dermnode import
        # __version__` (a name, not a module) imports the package dermnode itself
        modules = [a.name for a in node.names if a.name != "*" and _is_module(f"{base}.{a.name}", self.src)]
        if len(modules) < len(node.names):
            self._add(base, node.lineno)
        for name in modules:
            self._add(f"{base}.{name}", node.lineno)


def iter_imports(src: Path = SRC) -> list[Import]:
    """Every import of every module under ``src/dermnode``, in file and line order."""
    out: list[Import] = []
    for path in sorted((src / TOP).rglob("*.py")):
        collector = _Collector(module_name(path, src), path, src, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out.extend(collector.found)
    return out


def violations(imports: Sequence[Import], rules: Sequence[Rule] = RULES) -> list[tuple[Import, Rule]]:
    """The imports that break a rule, with the rule."""
    return [(imp, rule) for imp in imports for rule in rules if rule.broken_by(imp)]


def package_of(module: str) -> str:
    """``dermnode.inference.quality`` -> ``dermnode.inference``; a top-level module is its own package."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_edges(imports: Sequence[Import]) -> dict[tuple[str, str], bool]:
    """Package-to-package edges; the value is ``True`` when every import behind the edge is function-level."""
    edges: dict[tuple[str, str], bool] = {}
    for imp in imports:
        if not under(imp.target, (TOP,)) or imp.target == TOP:
            continue
        edge = (package_of(imp.source), package_of(imp.target))
        if edge[0] == edge[1]:
            continue
        edges[edge] = edges.get(edge, True) and imp.function_level
    return dict(sorted(edges.items()))


def _short(package: str) -> str:
    return package.removeprefix(f"{TOP}.")


def render(imports: Sequence[Import], rules: Sequence[Rule] = RULES) -> str:
    """The text of docs/architecture.md."""
    edges = package_edges(imports)
    nodes = sorted({p for e in edges for p in e} | set(PACKAGES))
    lines = [
        "# Architecture: packages and their imports",
        "",
        "<!-- generated by `python tools/import_graph.py` from an `ast` walk of src/dermnode; do not edit by hand."
        " tests/test_architecture.py fails when a rule below is broken or this file is stale. -->",
        "",
        "Imports point one way: the service (`service`, `pipeline`, `scp`, `workqueue`) uses the analysis "
        "(`inference`) and the output formats (`dicom_io`, `fhir`), which share only the neutral `vocabulary`; "
        "research code (`training`, `evaluation`) uses the runtime and is never imported by it. A dotted arrow is "
        "an import made only inside a function (the CLI dispatching a command). The web console (`web`), started "
        "by the service, reads the state and results the runtime wrote and ingests through the spool and job "
        "queue.",
        "",
        "```mermaid",
        "graph LR",
    ]
    for node in nodes:
        lines.append(f"    {_short(node).replace('.', '_')}[{_short(node)}]")
    for (a, b), lazy in edges.items():
        arrow = "-.->" if lazy else "-->"
        lines.append(f"    {_short(a).replace('.', '_')} {arrow} {_short(b).replace('.', '_')}")
    lines += ["```", "", "| package | owns | must never import |", "|---|---|---|"]
    for package, owns in PACKAGES.items():
        never: list[str] = []
        for rule in rules:
            if under(package, rule.sources) and not under(package, rule.exempt):
                forbidden = [_short(f) if f != TOP else "anything of dermnode" for f in rule.forbidden]
                text = ", ".join(f"`{f}`" if f != "anything of dermnode" else f for f in forbidden)
                if rule.allowed:
                    text += " except " + ", ".join(f"`{_short(a)}`" for a in rule.allowed)
                if under(package, rule.function_level_ok):
                    text += " (at module level)"
                never.append(text)
        lines.append(f"| `{_short(package)}` | {owns} | {'; '.join(never) or '—'} |")
    lines += ["", "Why each rule holds:", ""]
    for rule in rules:
        who = ", ".join(f"`{_short(s)}`" if s != TOP else "every module" for s in rule.sources)
        lines.append(f"* {who}: {rule.why}.")
    lines += [
        "",
        "Top-level modules not listed (`settings`, `errors`, `delivery`, `retention`, `metrics`, `logging_setup`) "
        "are shared plumbing; the rules above still bind who may import them.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on a broken rule or a stale docs/architecture.md")
    args = parser.parse_args(argv)
    imports = iter_imports()
    broken = violations(imports)
    for imp, rule in broken:
        print(f"{imp.where()}: {imp.source} imports {imp.target}: {rule.why}", file=sys.stderr)
    text = render(imports)
    if args.check:
        stale = not DOC.is_file() or DOC.read_text(encoding="utf-8") != text
        if stale:
            print(f"{DOC.relative_to(ROOT)} is stale: run python tools/import_graph.py", file=sys.stderr)
        return 1 if broken or stale else 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)} ({len(imports)} imports, {len(broken)} rule violations)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
