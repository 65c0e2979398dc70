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
