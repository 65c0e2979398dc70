"""End-to-end `neptune` command: train -> checkpoint -> eval -> predict, resume, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def neptune(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "neptune_ext.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"neptune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def digit_png(path, index=0, size=40):
    """A digit from the embedded set, drawn dark-on-light and enlarged (like a scan)."""
    from neptune_ext.data import _digits
    _, test = _digits()
    img = (255 - test.images[index, 0].numpy().astype(np.float32) * 255 / 16).astype(np.uint8)
    PIL.fromarray(img).resize((size, size)).save(path)
    return int(test.labels[index])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = neptune("train", "--dataset", "digits", "--out", str(out), "--epochs", "1", "--limit", "300",
                   "--no-progress")
    return out, proc


def test_train_writes_checkpoint_metrics_and_plots(trained):
    out, proc = trained
    for name in ("checkpoint.pt", "metrics.json", "training_curve.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["epochs"] == 1 and m["device"] == "cpu"
    assert set(m["per_class"]) == {str(i) for i in range(10)}
    assert {"precision", "recall", "f1", "support"} <= set(m["per_class"]["3"])
    assert "kernel_backend" in m and m["seconds"] > 0
    assert "test accuracy" in proc.stdout


def test_eval_and_predict(trained, tmp_path):
    out, _ = trained
    ev = neptune("eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", str(tmp_path / "e.json"))
    assert "test accuracy" in ev.stdout
    e = json.loads((tmp_path / "e.json").read_text())
    from neptune_ext.data import _digits
    n_test = len(_digits()[1])
    assert e["images"] == n_test and 0.0 <= e["test_accuracy"] <= 1.0  # the full digits test split
    assert sum(m["support"] for m in e["per_class"].values()) == n_test
    assert len([ln for ln in ev.stdout.splitlines() if ln.strip().split(" ")[0].isdigit()]) == 10
    png, jpg = tmp_path / "d.png", tmp_path / "d.jpg"
    digit_png(png)
    PIL.open(png).convert("RGB").save(jpg)
    pr = neptune("predict", str(png), str(jpg), "--checkpoint", str(out / "checkpoint.pt"))
    lines = pr.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        cls, prob = line.rsplit(": ", 1)[1].split(" (")
        assert cls in [str(i) for i in range(10)] and 0.0 < float(prob.rstrip(")")) <= 1.0


def test_resume_continues(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "resume"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    proc = neptune("train", "--dataset", "digits", "--out", str(run), "--epochs", "2", "--limit", "300",
                   "--resume", "--no-progress")
    assert "resuming from epoch 1" in proc.stdout and "epoch 2/2" in proc.stdout
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 2


def test_folder_dataset(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            arr[..., 0] = 250 if c == "cats" else 5
            PIL.fromarray(arr).save(root / c / f"{i}.png")
    out = tmp_path / "run"
    neptune("train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "16", "--out", str(out),
            "--epochs", "1", "--no-progress")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_class"]) == {"cats", "dogs"}


@pytest.mark.parametrize("args,match", [
    (["train", "--dataset", "mnist", "--out", "{tmp}"], "--data-dir is required for mnist"),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/nope", "--out", "{tmp}"], "is not a directory"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}", "--out", "{tmp}/o"], "cifar10 not found"),
    (["train", "--dataset", "folder", "--data-dir", "{tmp}", "--out", "{tmp}/o"], "holds no images"),
    (["eval", "--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["predict", "{tmp}/bad.png", "--checkpoint", "{ckpt}"], "not a readable image"),
    (["predict", "{tmp}/none.png", "--checkpoint", "{ckpt}"], "does not exist"),
    (["train", "--dataset", "digits", "--out", "{tmp}/r", "--resume"], "no checkpoint"),
])
def test_errors_are_one_line(args, match, tmp_path, trained):
    (tmp_path / "bad.png").write_text("this is not an image")
    args = [a.format(tmp=tmp_path, ckpt=trained[0] / "checkpoint.pt") for a in args]
    proc = neptune(*args, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and match in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
