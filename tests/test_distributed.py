"""`torchrun --nproc_per_node=2 -m neptune_app train ...`: data-parallel training with gloo on the
CPU: rank 0 alone writes, the ranks end bit-identical, accuracy close to one process, resumable."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train", "--dataset", "digits", "--epochs", "8", "--limit", "800"]


def _run(cmd, out):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(out.parent), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "neptune_app", *args]


def test_two_process_training_matches_one_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # Same global batch (2 x 32 = 64) and number of steps as the single process.
    p = _run(torchrun(*ARGS, "--batch-size", "32", "--out", str(ddp)), ddp)
    assert "2 processes (32 images each per step)" in p.stdout
    assert "weights and EMA bit-identical on every rank" in p.stdout
    assert p.stdout.count("epoch 8/8:") == 1  # rank 0 alone reports
    _run([sys.executable, "-m", "neptune_app", *ARGS, "--batch-size", "64", "--out", str(single)], single)
    m_ddp = json.loads((ddp / "metrics.json").read_text())
    m_one = json.loads((single / "metrics.json").read_text())
    assert m_ddp["test_accuracy"] >= 0.85 and m_one["test_accuracy"] >= 0.85
    assert abs(m_ddp["test_accuracy"] - m_one["test_accuracy"]) <= 0.06, (m_ddp["test_accuracy"],
                                                                          m_one["test_accuracy"])
    # Resumable: two more epochs on both ranks from rank 0's checkpoint.
    p = _run(torchrun("train", "--dataset", "digits", "--epochs", "10", "--limit", "800", "--batch-size",
                      "32", "--out", str(ddp), "--resume"), ddp)
    assert "resuming from epoch 8" in p.stdout and "epoch 10/10:" in p.stdout
    assert "bit-identical on every rank" in p.stdout
    assert len(json.loads((ddp / "metrics.json").read_text())["history"]) == 10
