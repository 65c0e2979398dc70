"""Sampled mini-batch training (neptune_app.sampled, examples/sampled_gat.py): the sampler's
subgraphs, one process, and two gloo processes under torchrun."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from neptune_app.sampled import NeighborSampler, synthetic_graph, train_sampled

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


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    torch.save({"x": torch.randn(5, 3), "edge_index": torch.tensor([[0, 9], [1, 2]]),
                "y": torch.zeros(5, dtype=torch.long)}, tmp_path / "g.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The example script itself (one process start); the other cases in this process.
    p = subprocess.run([sys.executable, EXAMPLE, "--data", str(tmp_path / "g.pt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "outside [0, 5)" in p.stderr and "Traceback" not in p.stderr, p.stderr
    for args, words in ((["--data", str(tmp_path / "none.pt")], "no file"),
                        (["--fanout", "5,x"], "--fanout")):
        code, _, err = _sampled(capsys, *args, "--out", tmp_path / "o")
        assert code == 2 and words in err and "Traceback" not in err, err


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


@pytest.mark.parametrize("layer", ["gat", "gatv2"])
def test_user_graphs_benchmark_runs(tmp_path, layer):
    """The user-sized benchmark's machinery (one round of the Cora-sized case, no compile),
    for both layers."""
    pytest.importorskip("torch_geometric")
    from neptune_app.bench import user_graphs
    rep = user_graphs.main(["--cases", "cora", "--layer", layer, "--rounds", "1", "--no-compile",
                            "--json", str(tmp_path / "u.json")])
    r = rep["results"][0]
    assert rep["layer"] == r["layer"] == layer
    assert r["case"] == "cora" and r["median_ms"]["neptune_ext"] > 0 and r["median_ms"]["pyg"] > 0
    assert json.loads((tmp_path / "u.json").read_text())["results"][0]["speedup_vs_pyg"]["median"] > 0


# ------------------------------------------------------------------ hostile --data files and arguments
TINY_RUN = ["--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--fanout", "3,3", "--hidden", "4",
            "--heads", "1", "--no-progress"]


def _tiny_graph():
    return synthetic_graph(40, 160, num_features=4, num_classes=3, seed=0)


def _sampled(capsys, *args):
    """(exit status, stdout, stderr) of examples/sampled_gat.py ARGS, run in this process."""
    from neptune_app.sampled import main
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: bad arguments
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _bad_graph(change):
    g = _tiny_graph()
    n = g["x"].shape[0]
    return {
        "mask too long": dict(g, train_mask=torch.ones(n + 1, dtype=torch.bool)),
        "mask too short": dict(g, val_mask=torch.ones(n - 1, dtype=torch.bool)),
        "float mask": dict(g, train_mask=g["train_mask"].float()),
        "2-D mask": dict(g, train_mask=g["train_mask"].view(-1, 1).repeat(1, 3)),
        "index mask out of range": dict(g, train_mask=torch.tensor([0, 1, n])),
        "empty train mask": dict(g, train_mask=torch.zeros(n, dtype=torch.bool)),
        "sparse x": dict(g, x=g["x"].to_sparse()),
        "x with nan": dict(g, x=g["x"].index_put((torch.tensor([3]), torch.tensor([1])),
                                                   torch.tensor(float("nan")))),
        "float64 x beyond float32": dict(g, x=g["x"].double() * 1e300),
        "negative labels": dict(g, y=g["y"] - 1),
        "huge label": dict(g, y=g["y"].index_fill(0, torch.tensor([0]), 10**9),
                           train_mask=torch.ones(n, dtype=torch.bool)),
        "no nodes": {"x": torch.zeros(0, 4), "edge_index": torch.zeros(2, 0, dtype=torch.long),
                     "y": torch.zeros(0, dtype=torch.long)},
        "no features": dict(g, x=torch.zeros(n, 0)),
        "bool edge_index": dict(g, edge_index=g["edge_index"].bool()),
        "a list": [g["x"], g["edge_index"], g["y"]],
    }[change]


@pytest.mark.parametrize("change,words", [
    ("mask too long", "train_mask is a mask of 41 entries; the graph has 40 nodes"),
    ("mask too short", "val_mask is a mask of 39 entries; the graph has 40 nodes"),
    ("float mask", "train_mask must be a bool mask or integer node ids, got torch.float32"),
    ("2-D mask", "train_mask must be 1-D"),
    ("index mask out of range", "train_mask holds node ids outside [0, 40)"),
    ("empty train mask", "train_mask selects no nodes"),
    ("sparse x", "x is a sparse tensor"),
    ("x with nan", "x holds NaN or inf"),
    ("float64 x beyond float32", "x (torch.float64) holds values beyond float32's range"),
    ("negative labels", "negative class ids on training/validation nodes"),
    ("huge label", "class ids must be below 10000"),
    ("no nodes", "the graph has no nodes"),
    ("no features", "x has no feature columns"),
    ("bool edge_index", "edge_index must be an integer [2, E] tensor of node ids, got torch.bool"),
    ("a list", "the graph must be a dict"),
])
def test_a_bad_data_file_is_one_line_and_exit_2(change, words, tmp_path, capsys):
    path = tmp_path / "g.pt"
    torch.save(_bad_graph(change), path)
    code, out, err = _sampled(capsys, "--data", path, "--out", tmp_path / "o", *TINY_RUN)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0] and str(path) in lines[0], err
    assert not out and not (tmp_path / "o" / "sampled_metrics.json").exists()


@pytest.mark.parametrize("change,said", [
    ("float64 x", "x is float64: converted to float32"),
    ("float16 x", "x is float16: converted to float32"),
    ("index masks", "train_mask holds"),
    ("uint8 mask", "train_mask is a uint8 0/1 mask: read as a bool mask"),
    ("unlabelled nodes", None),
])
def test_safely_convertible_data_is_converted_and_said(change, said, tmp_path, capsys):
    g = _tiny_graph()
    unlabelled = ~(g["train_mask"] | g["val_mask"])
    g = {"float64 x": dict(g, x=g["x"].double()),
         "float16 x": dict(g, x=g["x"].half()),
         "index masks": dict(g, train_mask=g["train_mask"].nonzero().view(-1).int(),
                             val_mask=g["val_mask"].nonzero().view(-1)),
         "uint8 mask": dict(g, train_mask=g["train_mask"].to(torch.uint8)),
         "unlabelled nodes": dict(g, y=torch.where(unlabelled, -1, g["y"]))}[change]
    torch.save(g, tmp_path / "g.pt")
    code, out, err = _sampled(capsys, "--data", tmp_path / "g.pt", "--out", tmp_path / "o", *TINY_RUN)
    assert code == 0, err
    notes = err.strip().splitlines()
    assert (said is None and not notes) or (len(notes) in (1, 2) and said in notes[0]), err
    m = json.loads((tmp_path / "o" / "sampled_metrics.json").read_text())
    assert m["history"][0]["steps"] == 1 and m["nodes"] == 40
    if change == "index masks":
        assert notes[1].startswith("sampled_gat: val_mask holds")


@pytest.mark.parametrize("args,words", [
    (["--lr", "nan"], "--lr: expected a positive finite number"),
    (["--lr", "-1"], "--lr: expected a positive finite number"),
    (["--lr", "1e300"], "--lr: expected a positive finite number at most 1"),
    (["--features", "0"], "--features: expected an integer from 1 to 4096, got 0"),
    (["--classes", "0"], "--classes: expected an integer from 1 to 10000, got 0"),
    (["--nodes", "1"], "--nodes: expected an integer from 2 to"),
    (["--device", "tpu"], "--device: must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--out", "{tmp}/afile"], "--out '{tmp}/afile' exists and is not a folder"),
    (["--seed", str(2**70)], "--seed: expected an integer from 0 to 4294967295"),
    (["--fanout", "0,5"], "--fanout: expected 1 to 8 integers from 1 to 10000"),
    (["--epochs", "-1"], "--epochs: expected an integer from 1 to 100000"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, words, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    out_dir = [] if "--out" in args else ["--out", tmp_path / "o"]
    code, out, err = _sampled(capsys, *args, *out_dir, "--nodes", "40", "--edges", "100", *TINY_RUN)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words.format(tmp=tmp_path) in lines[0], err
    assert not out and "Traceback" not in err


def test_sampled_metrics_survive_ctrl_c(tmp_path, capsys, monkeypatch):
    """sampled_metrics.json is written atomically: an interrupted write keeps the last one."""
    from neptune_app import _io
    args = ["--nodes", "40", "--edges", "100", "--out", tmp_path, *TINY_RUN]
    assert _sampled(capsys, *args)[0] == 0
    before = (tmp_path / "sampled_metrics.json").read_bytes()

    def interrupted(obj, f, **kw):
        f.write('{"nodes": ')
        raise KeyboardInterrupt
    monkeypatch.setattr(_io, "json", types.SimpleNamespace(dump=interrupted))
    code, out, err = _sampled(capsys, *args, "--seed", "1")
    assert code == 130 and "interrupted" in err
    assert (tmp_path / "sampled_metrics.json").read_bytes() == before
    assert os.listdir(tmp_path) == ["sampled_metrics.json"]
