"""The GPU session's tooling, checked here so a lent machine's minutes are not spent on a
typo: scripts/gpu_check.sh (dry run: every step and its budget), scripts/sanitizer_case.py's
arguments, and scripts/gpu_results.py turning an output folder into recorded files and the
README's generated GPU section."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_results  # noqa: E402


def test_gpu_check_dry_run_lists_every_step_with_its_budget(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for words in ("build", "extension loads", "pytest -m cuda", "--tool memcheck", "--tool racecheck",
                  "gpu_graph_attention.py", "gpu_stage.py", "user_graphs --device cuda --amp bf16"):
        assert words in summary, words
    assert summary.count("[budget") >= 8


def test_sanitizer_case_refuses_an_unknown_family():
    res = subprocess.run([sys.executable, "scripts/sanitizer_case.py", "gat", "nonsense"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "unknown kernel family" in res.stderr


def test_gpu_results_records_files_and_generates_the_readme_section(tmp_path):
    out = tmp_path / "gpu_out"
    out.mkdir()
    (out / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0",
                                              "commit": "abcdef0123", "timestamp": "2026-12-05T10:00:00+00:00"}))
    (out / "user_graphs_bf16.json").write_text(json.dumps({"benchmark": "user_graphs", "results": [
        {"case": "cora", "amp": "bf16", "median_ms": {"neptune_ext": 1.5, "pyg": 3.25}}]}))
    (out / "summary.txt").write_text("PASS  build (80 s of 150)\nFAIL  pytest -m cuda tests (exit 1)\n")
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    results = tmp_path / "results"
    assert gpu_results.main([str(out), "--results", str(results), "--readme", str(readme)]) == 0
    rec = json.loads((results / "h200-2026-12-05-user-graphs-bf16.json").read_text())
    assert rec["device"] == "NVIDIA H200" and rec["commit"] == "abcdef0123"
    assert rec["results"][0]["median_ms"]["pyg"] == 3.25
    text = readme.read_text()
    section = text.split(gpu_results.BEGIN)[1].split(gpu_results.END)[0]
    assert "FAIL  pytest -m cuda tests" in section and "h200-2026-12-05-user-graphs-bf16.json" in section
    assert "| cora | bf16 | 1.5 | 3.25 |" in section
    # the rest of the README is untouched, and a second run replaces the section
    assert text.replace(section, "") == open(os.path.join(ROOT, "README.md")).read().replace(
        open(os.path.join(ROOT, "README.md")).read().split(gpu_results.BEGIN)[1].split(gpu_results.END)[0], "")
    gpu_results.main([str(out), "--results", str(results), "--readme", str(readme)])
    assert readme.read_text().count(gpu_results.BEGIN) == 1


def test_gpu_results_refuses_a_folder_without_env(tmp_path):
    with pytest.raises(SystemExit, match="env.json"):
        gpu_results.main([str(tmp_path), "--dry-run"])
