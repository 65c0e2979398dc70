"""neptune_app.bench.host runs and records (a smoke test: nothing here is timed or judged
by speed; the op counts are deterministic and checked for sanity only)."""
import json

import pytest

from neptune_app.bench import host


def test_host_bench_records_time_and_op_calls(tmp_path, capsys):
    pytest.importorskip("torch_geometric")
    path = tmp_path / "host.json"
    host.main(["--cases", "tiny", "--repeats", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    for kind in ("gat", "gatv2", "transformer"):
        row = report["results"][f"{kind} / tiny"]
        assert row["ours"]["us"] > 0 and row["PyG"]["us"] > 0
        assert 0 < row["ours"]["op_calls"] and 0 < row["PyG"]["op_calls"]
    assert "gat / tiny" in capsys.readouterr().out


def test_host_bench_refuses_an_unknown_case():
    with pytest.raises(SystemExit):
        host.main(["--cases", "huge"])
    with pytest.raises(SystemExit):
        host.main(["--kinds", "gcn"])


def test_sampled_step_bench_counts_a_step(monkeypatch):
    """neptune_app.bench.sampled_step on a small synthetic graph: a step's time and op calls
    for both stacks (PyG's with our stack's weights)."""
    pytest.importorskip("torch_geometric")
    from neptune_app.bench import sampled_step
    res = sampled_step.run(threads=1, steps=2, nodes=3000, edges=20000)
    assert set(res["median_us"]) == {"neptune_ext", "pyg"}
    assert res["op_calls_per_step"]["neptune_ext"] > 0 and res["op_calls_per_step"]["pyg"] > 0
    assert res["edges_per_batch"] > 0
