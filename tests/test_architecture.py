"""Import rules between dermnode's packages (see docs/architecture.md), checked with the stdlib ``ast``.

The walk and the rules live in ``tools/import_graph.py``, which also generates docs/architecture.md, so the
rules tested here are the ones the document states.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)
    spec.loader.exec_module(module)
    return module


graph = _load_tool()


def test_no_forbidden_import() -> None:
    broken = graph.violations(graph.iter_imports())
    report = "\n".join(f"{imp.where()}: {imp.source} imports {imp.target} — {rule.why}" for imp, rule in broken)
    assert not broken, f"forbidden imports:\n{report}"


def test_architecture_document_is_up_to_date() -> None:
    expected = graph.render(graph.iter_imports())
    assert graph.DOC.read_text(encoding="utf-8") == expected, (
        "docs/architecture.md is stale: run `python tools/import_graph.py`"
    )


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for folder in {p.parent for p in src.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return src


def _broken(src: Path) -> list[str]:
    return sorted(
        f"{imp.path.relative_to(src)}:{imp.line} {imp.target}" for imp, _ in graph.violations(graph.iter_imports(src))
    )


def test_the_check_finds_each_kind_of_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: module-level, function-level, relative and ``from package import module`` forms."""
    src = _tree(
        tmp_path,
        {
            "dermnode/errors.py": "",
            "dermnode/vocabulary.py": "from dermnode.errors import X\nfrom dermnode import settings\n",
            "dermnode/settings.py": "",
            "dermnode/training/fit.py": "from dermnode.evaluation import metrics\n",
            "dermnode/evaluation/metrics.py": "import dermnode.training.fit\n",
            "dermnode/cli.py": "def train():\n    from dermnode.training.fit import fit\n",
            "dermnode/pipeline.py": "def run():\n    import dermnode.evaluation.metrics\n",
            "dermnode/fhir/codes.py": "from ..dicom_io import codes\n",
            "dermnode/dicom_io/codes.py": "from dermnode.vocabulary import Band\n",
            "dermnode/inference/quality.py": "from dermnode.workqueue.durable import atomic_write\n",
            "dermnode/workqueue/durable.py": "",
            "dermnode/scp/server.py": "from dermnode.dicom_io.uids import X\nfrom dermnode.dicom_io import sr\n",
            "dermnode/dicom_io/uids.py": "",
            "dermnode/dicom_io/sr.py": "",
        },
    )
    assert _broken(src) == [
        "dermnode/fhir/codes.py:1 dermnode.dicom_io.codes",
        "dermnode/inference/quality.py:1 dermnode.workqueue.durable",
        "dermnode/pipeline.py:2 dermnode.evaluation.metrics",
        "dermnode/scp/server.py:2 dermnode.dicom_io.sr",
        "dermnode/vocabulary.py:2 dermnode.settings",
    ]


@pytest.mark.parametrize(
    ("source", "target", "lazy", "allowed"),
    [
        ("dermnode.cli", "dermnode.evaluation.runner", True, True),
        ("dermnode.cli", "dermnode.evaluation.runner", False, False),
        ("dermnode.service", "dermnode.training", True, False),
        ("dermnode.evaluation.pipeline", "dermnode.training.classification", False, True),
        ("dermnode.vocabulary", "dermnode.errors", False, True),
        ("dermnode.dicom_io.seg", "dermnode.vocabulary", False, True),
        ("dermnode.scp.server", "dermnode.dicom_io.uids", False, True),
        ("dermnode.workqueue.outbox", "dermnode.settings", False, True),
        ("dermnode.web.state", "dermnode.workqueue.jobs", False, True),
        ("dermnode.web.ingest", "dermnode.dicom_io.wrap", False, True),
        ("dermnode.web.ingest", "dermnode.scp.spool", False, True),
        ("dermnode.web.app", "dermnode.inference.quality", False, False),
        ("dermnode.web.app", "dermnode.pipeline", True, False),
        ("dermnode.web.app", "dermnode.dicom_io.seg", False, False),
        ("dermnode.web.app", "dermnode.service", False, False),
        ("dermnode.service", "dermnode.web.server", False, True),
        ("dermnode.pipeline", "dermnode.web.app", False, False),
        ("dermnode.scp.server", "dermnode.web", True, False),
    ],
)
def test_rules(source: str, target: str, lazy: bool, allowed: bool) -> None:
    imp = graph.Import(source, target, Path("x.py"), 1, lazy)
    assert (not graph.violations([imp])) is allowed
