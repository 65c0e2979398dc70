"""Sampled mini-batch training (neptune_ext.sampled, examples/sampled_gat.py): the sampler's
subgraphs, one process, and two gloo processes under torchrun."""
import json
import os
import subprocess
import sys

import torch

from neptune_ext.sampled import NeighborSampler, synthetic_graph, train_sampled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "sampled_gat.py")


def test_sampler_draws_real_edges_within_the_fanout():
    n = 300
    ei = torch.randint(0, n, (2, 4000))
    ei[1, :600] = 0  # a hub with >= 600 in-edges
    seeds = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1)[:39] + 1])  # the hub first
    s = NeighborSampler(ei, n, [5, 3], generator=torch.Generator().manual_seed(1))
    nodes, sub, bs = s.sample(seeds)
    assert bs == 40 and torch.equal(nodes[:40], seeds)
    assert nodes.unique().numel() == nodes.numel()  # local ids are a relabelling
    glob = torch.stack([nodes[sub[0]], nodes[sub[1]]])
    real = set(map(tuple, ei.t().tolist()))
    assert all(tuple(e) in real for e in glob.t().tolist())  # only real edges
    assert glob.t().unique(dim=0).shape[0] == glob.shape[1]  # no repeats
    indeg = torch.bincount(ei[1], minlength=n)
    got = torch.bincount(glob[1], minlength=n)
    first = seeds
    assert (got[first] <= 5).all() and got[0] >= 1
    small = first[indeg[first] <= 5]
    for v in small.tolist():  # low-degree seeds keep every distinct in-edge
        assert got[v] == ei[:, ei[1] == v].t().unique(dim=0).shape[0]


def test_one_process_learns(tmp_path):
    data = synthetic_graph(4000, 40_000, num_features=16, num_classes=4, seed=3)
    m = train_sampled(data, str(tmp_path), epochs=2, batch_size=128, fanout=[5, 5], hidden=8, heads=2,
                      progress=False, quiet=True)
    h = m["history"]
    assert len(h) == 2 and h[-1]["loss"] < h[0]["first_step_loss"]
    assert h[-1]["val_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert json.loads((tmp_path / "sampled_metrics.json").read_text())["sampler"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    torch.save({"x": torch.randn(5, 3), "edge_index": torch.tensor([[0, 9], [1, 2]]),
                "y": torch.zeros(5, dtype=torch.long)}, tmp_path / "g.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args, words in ((["--data", str(tmp_path / "g.pt")], "outside [0, 5)"),
                        (["--data", str(tmp_path / "none.pt")], "no file"),
                        (["--fanout", "5,x"], "--fanout")):
        p = subprocess.run([sys.executable, EXAMPLE, *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_two_gloo_processes_stay_identical(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", EXAMPLE,
           "--nodes", "3000", "--edges", "30000", "--features", "16", "--classes", "4", "--epochs", "2",
           "--batch-size", "64", "--fanout", "5,5", "--hidden", "8", "--heads", "2", "--max-steps", "8",
           "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "weights bit-identical on every rank" in p.stdout
    m = json.loads((tmp_path / "sampled_metrics.json").read_text())
    assert m["world_size"] == 2 and m["ranks_identical"]
    h = m["history"]
    assert [r["steps"] for r in h] == [8, 8]
    assert h[-1]["loss"] < h[0]["first_step_loss"]  # the loss falls


def test_user_graphs_benchmark_runs(tmp_path):
    """The user-sized benchmark's machinery (one round of the Cora-sized case, no compile)."""
    import pytest
    pytest.importorskip("torch_geometric")
    from neptune_ext.bench import user_graphs
    rep = user_graphs.main(["--cases", "cora", "--rounds", "1", "--no-compile", "--json", str(tmp_path / "u.json")])
    r = rep["results"][0]
    assert r["case"] == "cora" and r["median_ms"]["neptune_ext"] > 0 and r["median_ms"]["pyg"] > 0
    assert json.loads((tmp_path / "u.json").read_text())["results"][0]["speedup_vs_pyg"]["median"] > 0
