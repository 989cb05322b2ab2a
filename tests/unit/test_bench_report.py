"""The quality bench's report is a function of its numbers: every committed report in docs/evidence is rebuilt, byte
for byte, from its report.json (its answers, claims and report.md), and the method registry is the one place a
method is described."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfgan_core.bench import methods
from hfgan_core.bench.answers import claims, questions
from hfgan_core.bench.report_md import markdown
from hfgan_core.config import RunConfig

EVIDENCE = Path(__file__).resolve().parents[2] / "docs" / "evidence"
REPORTS = sorted(p.parent.name for p in EVIDENCE.glob("*/report.json"))


def test_there_are_committed_reports():
    assert len(REPORTS) >= 5, REPORTS


@pytest.mark.parametrize("name", REPORTS)
def test_a_committed_report_is_rebuilt_from_its_numbers(name):
    rep = json.loads((EVIDENCE / name / "report.json").read_text())
    cfg = RunConfig.from_dict(rep["config"])
    domains = list(cfg.scenario.domain_names)
    results = rep["methods"]
    assert claims(results, domains) == rep["claims"]
    assert questions(results, domains, "headline") == rep["answers"]
    assert questions(results, domains, "further") == rep["more_answers"]
    assert markdown(rep, cfg) == (EVIDENCE / name / "report.md").read_text()


def test_every_method_is_one_complete_registry_entry():
    names = [m.name for m in methods.REGISTRY]
    assert len(set(names)) == len(names) and methods.METHODS == tuple(names)
    assert [m for m in methods.REGISTRY if m.role.reference] == [methods.BY_NAME["huscf"]]
    for m in methods.REGISTRY:
        assert m.label and m.description and m.latency in methods.LATENCY_MODELS
        assert m.is_split == (m.latency is methods.SPLIT_LATENCY) == (m.latency.compute is None)
    assert set(methods.SPLIT_METHODS) | set(methods.BASELINES) == set(names)
    assert methods.questioned("headline") == ["fedgan", "no_clustering"]
    with pytest.raises(ValueError, match="unknown bench method"):
        methods.method("gan9000")


def test_quality_and_report_do_not_import_each_other():
    # The bench writes the report (quality -> report); nothing the report is made of imports the bench.
    root = Path(methods.__file__).parent
    for mod in ("report", "methods", "answers", "report_md", "scale"):
        text = (root / f"{mod}.py").read_text()
        assert "from .quality import" not in text and "import quality" not in text, mod
        assert mod == "report" or "from .report import" not in text, mod
