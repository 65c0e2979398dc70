"""The GPU session's tooling, checked here so a lent machine's minutes are not spent on a
typo: scripts/gpu_check.sh (dry run: every step and its budget), scripts/sanitizer_case.py's
arguments (and its graph-transformer cases, run on the CPU kernels), the GPU benchmark's
graph-transformer contenders (built and run on the CPU, torch.compile with the eager backend;
its main loop with the CUDA parts stubbed), and scripts/gpu_results.py turning an output folder
into recorded files and the README's generated GPU section."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_results  # noqa: E402
import sanitizer_case  # noqa: E402
from neptune_app.bench import gpu_graph_attention as gga  # noqa: E402


def test_gpu_check_dry_run_lists_every_step_with_its_budget(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for words in ("build", "extension loads", "pytest -m cuda", "--tool memcheck", "--tool racecheck",
                  "gpu_graph_attention.py", "--what transformer", "bench_transformer.json"):
        assert words in summary, words
    dry = [ln for ln in summary.splitlines() if ln.startswith("DRY")]
    # the sanitizer runs every family, the graph transformer's too, under both tools
    sanitizer = [ln for ln in dry if "compute-sanitizer --tool" in ln]
    assert len(sanitizer) == 2 and all("graph transformer" in ln for ln in sanitizer)
    assert all(ln.rstrip().endswith("scripts/sanitizer_case.py") for ln in sanitizer)  # all families
    budgets = [int(b) for b in re.findall(r"\[budget (\d+) s\]", "\n".join(dry))]
    assert len(budgets) == 7
    # the default steps fit one device command (at most 600 s), about nine minutes
    assert sum(budgets) <= 570, budgets
    # the second call on the warm machine: the Stage and user-graph benchmarks (both layers)
    env2 = dict(env, STEPS="stagebench usergraphs usergraphsv2", OUT=str(tmp_path / "second"))
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env2, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    second = (tmp_path / "second" / "summary.txt").read_text()
    for words in ("gpu_stage.py", "--layer gat --amp bf16", "--layer gatv2 --amp bf16",
                  "user_graphs_bf16.json", "user_graphs_gatv2_bf16.json", "user_graphs_gatv2_none.json"):
        assert words in second, words
    budgets2 = [int(b) for b in re.findall(r"\[budget (\d+) s\]", second)]
    assert sum(budgets2) <= 280, budgets2


def test_gpu_check_runs_only_the_steps_asked_for(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable,
               STEPS="transformerbench", BUDGET_TRANSFORMERBENCH="33", QUICK="1")
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    dry = [ln for ln in (tmp_path / "summary.txt").read_text().splitlines() if ln.startswith("DRY")]
    assert len(dry) == 2 and "extension loads" in dry[0]  # the load check always runs
    assert "--what transformer" in dry[1] and "--quick" in dry[1] and "[budget 33 s]" in dry[1]


def test_sanitizer_case_refuses_an_unknown_family():
    res = subprocess.run([sys.executable, "scripts/sanitizer_case.py", "gat", "nonsense"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "unknown kernel family" in res.stderr
    res = subprocess.run([sys.executable, "scripts/sanitizer_case.py", "transformer", "nonsense"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "['nonsense']" in res.stderr and "transformer" in res.stderr


def test_sanitizer_case_knows_the_transformer_family():
    assert sanitizer_case.FAMILIES[-1] == "transformer"  # the default runs it, last
    res = subprocess.run([sys.executable, "scripts/sanitizer_case.py", "transformer"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert "unknown kernel family" not in res.stderr  # (without a GPU it stops later)
    if not torch.cuda.is_available():
        assert res.returncode != 0


def test_sanitizer_transformer_cases_run_on_the_cpu_kernels():
    """The sanitizer's graph-transformer cases, on the CPU kernels: the shapes a CUDA kernel
    runs (H * C <= 1024, never the reference), every lane-layout kind, both index types,
    edge features and dropout, a bipartite graph; forward and backward finite."""
    from neptune_ext import backend
    if not backend.runs_kernel("transformer_forward", "cpu"):
        pytest.skip("no compiled CPU transformer kernel")
    g32, g64 = sanitizer_case.graphs("cpu")
    cases = sanitizer_case.transformer_cases(g32, g64)
    per_lane = {-(-H * C // 32) for _, H, C, *_ in cases}
    assert {1, 2, 3, 32} <= per_lane and max(H * C for _, H, C, *_ in cases) == 1024
    assert {g.rowptr.dtype for g, *_ in cases} == {torch.int32, torch.int64}
    assert {dt for _, _, _, dt, *_ in cases} == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    assert any(p > 0 for *_, p, _ in cases) and any(ef for *_, ef in cases)
    assert any(g.num_src != g.num_dst for g, *_ in cases)
    for case in cases:
        sanitizer_case.run_transformer(*case)


# ---------------------------------------------------------------- the GPU benchmark, on the CPU

def test_gpu_bench_contender_names():
    assert gga.contender_names("transformer") == list(gga.TRANSFORMER)
    assert gga.contender_names("op,layer,gatv2")[:2] == ["op:neptune", "op:reference"]
    assert "transformer:pyg_compiled" in gga.PEERS["transformer:neptune"]
    with pytest.raises(ValueError, match="nonsense"):
        gga.contender_names("layer,nonsense")


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_gpu_bench_transformer_contenders_agree_on_cpu(amp):
    """GraphTransformer, TransformerConv and torch.compile(TransformerConv) as the benchmark
    builds them (the same weights; here on the CPU, compiled with the eager backend): the same
    output, in the dtype of the output gradient, and a backward to every leaf."""
    pytest.importorskip("torch_geometric")
    g = torch.Generator().manual_seed(0)
    n, E, H, C, fin = 60, 400, 2, 8, 12
    ei = torch.randint(0, n, (2, E), generator=g)
    outs = {}
    for name in gga.TRANSFORMER:
        torch.manual_seed(1)  # the same x and output gradient for every contender
        fwd, leaves, grad = gga.make_transformer(name, ei, n, fin, H, C, amp, edge_dim=3, device="cpu",
                                                 compile_backend="eager")
        out = fwd()
        assert out.dtype == grad.dtype == (amp or torch.float32) and out.shape == grad.shape == (n, H * C)
        out.backward(grad)
        assert all(t.grad is not None for t in leaves)
        outs[name] = (out.detach().double(), leaves[0].grad.double())
    tol = 1e-5 if amp is None else 5e-2
    ref_out, ref_gx = outs["transformer:pyg"]
    for name in ("transformer:neptune", "transformer:pyg_compiled"):
        assert torch.allclose(outs[name][0], ref_out, atol=tol, rtol=tol), name
        assert torch.allclose(outs[name][1], ref_gx, atol=tol, rtol=tol), name


def test_gpu_bench_run_contender_transformer_glue(monkeypatch):
    """run_contender's graph-transformer branch (fp32 -> no autocast, bf16 -> autocast, the
    untimed compile step, the records) with the CUDA timers stubbed, on the CPU."""
    pytest.importorskip("torch_geometric")
    real_make = gga.make_transformer
    monkeypatch.setattr(gga, "make_transformer", lambda *a, **k: real_make(
        *a, **{**k, "device": "cpu", "compile_backend": "eager"}))
    seen = []

    def time_fwd_bwd(fwd, leaves, grad, warmup, repeats):
        out = fwd()
        seen.append(out.dtype)
        out.backward(grad)
        return 1.0, 2.0, [3.0]
    monkeypatch.setattr(gga, "time_fwd_bwd", time_fwd_bwd)
    monkeypatch.setattr(gga, "peak_bytes", lambda *a: 123)
    monkeypatch.setattr(gga, "free", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ei = torch.randint(0, 50, (2, 300))
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bfloat16 autocast")):
        for name in gga.TRANSFORMER:
            rec = gga.run_contender(name, ei, 50, 12, 2, 8, dtype, 1, 1, 1e12, edge_dim=0)
            assert "error" not in rec, rec
            assert rec["precision"] == precision and rec["total_ms"] == 3.0 and rec["peak_bytes"] == 123
            assert ("compile_seconds" in rec) == (name == "transformer:pyg_compiled")
    assert seen == [torch.float32] * 3 + [torch.bfloat16] * 3


def fake_bench_run(monkeypatch, tmp_path, argv):
    """gpu_graph_attention.main with its CUDA parts stubbed: the graphs drawn on the CPU, every
    contender's figures made up (transformer:neptune 2 ms, TransformerConv 6 ms and OOM on the
    large graph, compiled 4 ms). Returns (report, the contenders run in order)."""
    calls = []

    def run_contender(name, ei, n, in_ch, H, C, dtype, warmup, repeats, copy_bw, edge_dim=0):
        calls.append((n, name, dtype))
        if name == "transformer:pyg" and n > 400:
            return {"result": "OOM"}
        total = {"transformer:neptune": 2.0, "transformer:pyg": 6.0}.get(name, 4.0)
        rec = {"forward_ms": total / 4, "backward_ms": 3 * total / 4, "total_ms": total,
               "peak_bytes": int(total * 2**30)}
        if name == "transformer:pyg_compiled":
            rec["compile_seconds"] = 12.5
        return rec

    real_edges = gga.power_law_edges
    monkeypatch.setattr(gga, "GRAPHS", {"arxiv": (300, 2000), "products": (500, 5000)})
    monkeypatch.setattr(gga, "run_contender", run_contender)
    monkeypatch.setattr(gga, "power_law_edges", lambda *a, **k: real_edges(*a, **{**k, "device": "cpu"}))
    monkeypatch.setattr(gga, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(gga, "free", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: type("P", (), {"multi_processor_count": 132, "total_memory": 1})())
    path = tmp_path / "bench_transformer.json"
    report = gga.main(argv + ["--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    return report, calls


def test_gpu_bench_transformer_main_loop(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch_geometric")
    report, calls = fake_bench_run(monkeypatch, tmp_path,
                                   ["--what", "transformer", "--compile-max-edges", "3000"])
    # every eager contender of every graph first, then torch.compile on the small graph only
    names = [name for _, name, _ in calls]
    assert names[:8] == ["transformer:neptune", "transformer:pyg"] * 4
    assert calls[8:] == [(300, "transformer:pyg_compiled", torch.float32),
                         (300, "transformer:pyg_compiled", torch.bfloat16)]
    assert report["complete"] and report["config"]["what"] == "transformer"
    res = report["results"]
    assert list(res) == ["arxiv/fp32", "arxiv/bf16", "products/fp32", "products/bf16"]
    ours = res["arxiv/bf16"]["contenders"]["transformer:neptune"]
    assert ours["speedup_vs"] == {"pyg": 3.0, "pyg_compiled": 2.0}
    assert ours["memory_vs"] == {"pyg": 2 / 6, "pyg_compiled": 0.5}
    big = res["products/fp32"]["contenders"]
    assert big["transformer:neptune"]["speedup_vs"] == {"pyg": "peer OOM"}
    assert big["transformer:pyg_compiled"] == {"result": "skipped", "why": "E > --compile-max-edges 3000"}
    table = capsys.readouterr().out.split("\ngraph ", 1)[1]
    assert re.search(r"arxiv +bf16 +transformer:neptune .* 3\.00x / 2\.00x", table)
    assert re.search(r"products +fp32 +transformer:pyg +OOM", table)


def test_gpu_results_tables_the_transformer_benchmark(monkeypatch, tmp_path):
    """bench_transformer.json as the benchmark writes it -> a recorded file and one README row
    per contender, with its ratios to TransformerConv and torch.compile(TransformerConv)."""
    pytest.importorskip("torch_geometric")
    out = tmp_path / "gpu_out"
    out.mkdir()
    fake_bench_run(monkeypatch, out, ["--what", "transformer", "--compile-max-edges", "3000"])
    (out / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0",
                                              "commit": "abcdef0123", "timestamp": "2026-12-05T10:00:00+00:00"}))
    (out / "summary.txt").write_text(
        "PASS  benchmark (benchmarks/gpu_graph_attention.py --what transformer) (40 s of 55)\n")
    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    results = tmp_path / "results"
    assert gpu_results.main([str(out), "--results", str(results), "--readme", str(readme)]) == 0
    rec = json.loads((results / "h200-2026-12-05-bench-transformer.json").read_text())
    assert rec["results"]["arxiv/fp32"]["contenders"]["transformer:pyg_compiled"]["compile_seconds"] == 12.5
    section = readme.read_text().split(gpu_results.BEGIN)[1].split(gpu_results.END)[0]
    assert "h200-2026-12-05-bench-transformer.json" in section and "incomplete" not in section
    assert ("| case | contender | fwd ms | bwd ms | fwd+bwd ms | speedup | peak GiB | memory | compile s "
            "| result |") in section
    assert "| arxiv/fp32 | transformer:neptune | 0.5 | 1.5 | 2 | vs pyg 3x; vs pyg_compiled 2x | 2 | " \
           "vs pyg 0.3333; vs pyg_compiled 0.5 |  |  |" in section
    assert "| arxiv/fp32 | transformer:pyg_compiled | 1 | 3 | 4 |  | 4 |  | 12.5 |  |" in section
    assert "| products/bf16 | transformer:pyg |  |  |  |  |  |  |  | OOM |" in section
    assert "| products/bf16 | transformer:pyg_compiled |  |  |  |  |  |  |  | skipped |" in section
    assert "| products/bf16 | transformer:neptune | 0.5 | 1.5 | 2 | vs pyg peer OOM |" in section
    # a run its step cut short (the JSON is written after every contender) says so
    rep = json.loads((out / "bench_transformer.json").read_text())
    rep["complete"] = False
    (out / "bench_transformer.json").write_text(json.dumps(rep))
    gpu_results.main([str(out), "--results", str(results), "--readme", str(readme)])
    assert "(incomplete:" in readme.read_text()


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
