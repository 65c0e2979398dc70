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
    proc = subprocess.run([sys.executable, "-m", "neptune_app.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"neptune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def digit_png(path, index=0, size=40):
    """A digit from the embedded set, drawn dark-on-light and enlarged (like a scan)."""
    from neptune_app.data import _digits
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
    from neptune_app.data import _digits
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


# ------------------------------------------------------------------ trust: files and arguments
class _Payload:
    """Unpickling this runs open(marker, 'w'): a harmless stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bomb_png(path, width=20000, height=20000):
    """A tiny PNG whose header claims width x height pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0"))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("command", ["predict", "eval", "resume"])
def test_a_crafted_checkpoint_runs_nothing(command, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.pt"
    torch.save({"model_name": "neptune", "data": _Payload(str(marker))}, ckpt)
    digit_png(tmp_path / "d.png")
    args = {"predict": ["predict", str(tmp_path / "d.png"), "--checkpoint", str(ckpt)],
            "eval": ["eval", "--checkpoint", str(ckpt)],
            "resume": ["train", "--dataset", "digits", "--out", str(run), "--resume", "--epochs", "1",
                       "--no-progress"]}[command]
    proc = neptune(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "not a neptune checkpoint" in err[0], proc.stderr
    assert not marker.exists()


def _folder_of(root, classes, n=3, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            PIL.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("args,match", [
    (["train", "--out", "{tmp}/o", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["train", "--out", "{tmp}/o", "--epochs", "-1"], "--epochs: expected a positive integer, got -1"),
    (["train", "--out", "{tmp}/o", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["train", "--out", "{tmp}/o", "--image-size", "0"], "--image-size: expected an integer from 1 to 512"),
    (["train", "--out", "{tmp}/o", "--limit", "0"], "--limit: expected a positive integer"),
    (["train", "--out", "{tmp}/o", "--lr", "nan"], "--lr: expected a positive finite number"),
    (["train", "--out", "{tmp}/o", "--lr", "-1"], "--lr: expected a positive finite number"),
    (["train", "--out", "{tmp}/afile"], "exists and is not a folder"),
    (["train", "--out", "{tmp}/afile/sub"], "cannot be created"),
    (["eval", "--checkpoint", "{ckpt}", "--json", "{tmp}/nodir/e.json"], "does not exist"),
    (["eval", "--checkpoint", "{ckpt}", "--json", "{tmp}"], "is a folder"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "folder", "--data-dir", "{twelve}"],
     "classes the model does not know: a, b"),
    (["eval", "--checkpoint", "{ckpt}", "--dataset", "folder", "--data-dir", "{pets}"],
     "classes the model does not know: cats, dogs"),
    (["train", "--out", "{foreign_run}", "--resume"], "is not a neptune"),
    (["eval", "--checkpoint", "{other_config}"], "another model configuration"),
    (["predict", "{tmp}/bomb.png", "--checkpoint", "{ckpt}"], "too large to read safely"),
    (["bogus-command"], "invalid choice"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, match, tmp_path, trained):
    (tmp_path / "afile").write_text("x")
    _bomb_png(tmp_path / "bomb.png")
    twelve = _folder_of(tmp_path / "twelve", [str(i) for i in range(10)] + ["a", "b"])
    pets = _folder_of(tmp_path / "pets", ["cats", "dogs"])
    foreign_run = tmp_path / "foreign"
    foreign_run.mkdir()
    torch.save({"weights": torch.zeros(3)}, foreign_run / "checkpoint.pt")
    ckpt_path = trained[0] / "checkpoint.pt"
    ck = torch.load(ckpt_path, weights_only=True)
    ck["model_config"] = dict(ck["model_config"], width=ck["model_config"]["width"] * 2)
    torch.save(ck, tmp_path / "other.pt")
    args = [a.format(tmp=tmp_path, ckpt=ckpt_path, twelve=twelve, pets=pets, foreign_run=foreign_run,
                     other_config=tmp_path / "other.pt") for a in args]
    proc = neptune(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and match in err[0], proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()


def test_eval_on_a_folder_with_a_subset_of_the_classes_maps_labels_by_name(tmp_path, trained):
    from neptune_app.data import _digits
    _, test = _digits()
    root = tmp_path / "subset"
    for c in ("3", "7"):
        (root / c).mkdir(parents=True)
    for i in range(len(test)):
        label = int(test.labels[i])
        if label in (3, 7):
            img = (test.images[i, 0].numpy().astype(np.float32) * 255 / 16).astype(np.uint8)
            PIL.fromarray(img).save(root / str(label) / f"{i}.png")
    proc = neptune("eval", "--checkpoint", str(trained[0] / "checkpoint.pt"), "--dataset", "folder",
                   "--data-dir", str(root), "--json", str(tmp_path / "e.json"))
    e = json.loads((tmp_path / "e.json").read_text())
    support = {c: m["support"] for c, m in e["per_class"].items() if m["support"]}
    assert set(support) == {"3", "7"}, proc.stdout


# ------------------------------------------------------------------ predictions on drawn digits
@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A digits model trained for 10 epochs on the whole set (about 15 s)."""
    from neptune_app.train import train
    out = tmp_path_factory.mktemp("digits10")
    torch.set_num_threads(2)
    train("digits", str(out), epochs=10, progress=False)
    return out / "checkpoint.pt"


def test_rendered_digits_are_read_like_the_training_digits(digits_model):
    from neptune_app.bench.drawn_digits import evaluate, find_fonts
    if not find_fonts():
        pytest.skip("no TrueType fonts on this machine")
    with_pre = evaluate(str(digits_model), preprocess=True)
    without = evaluate(str(digits_model), preprocess=False)
    assert with_pre["images"] >= 480
    # Measured 0.87 with preprocessing against 0.35 without (10-epoch model, DejaVu fonts).
    assert with_pre["accuracy"] >= 0.7, with_pre
    assert with_pre["accuracy"] >= without["accuracy"] + 0.25, (with_pre, without)
    pol = with_pre["by_polarity"]
    assert abs(pol["dark-on-light"] - pol["light-on-dark"]) < 0.05, pol


def test_predict_topk_json_and_empty_images(digits_model, tmp_path):
    from neptune_app.bench.drawn_digits import find_fonts, render_digit
    fonts = find_fonts()
    render_digit(4, fonts[0] if fonts else None, 120, 0.06, 0.15, True).save(tmp_path / "four.png")
    PIL.new("L", (90, 60), 250).save(tmp_path / "blank.png")
    proc = neptune("predict", str(tmp_path / "four.png"), str(tmp_path / "blank.png"), "--checkpoint",
                   str(digits_model), "--topk", "3", "--json", str(tmp_path / "p.json"))
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'four.png'}: ") and lines[0].count("(") == 3
    assert "looks empty" in lines[1]
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res[0]["topk"]) == 3 and res[0]["class"] == res[0]["topk"][0][0]
    assert 0 < sum(p for _, p in res[0]["topk"]) <= 1 + 1e-6 and res[1]["class"] is None


# ------------------------------------------------------------------ EMA on short runs
def colour_folder(root, per_class, size, seed):
    """An image folder of two classes told apart by colour alone (cats red, dogs blue)."""
    rng = np.random.default_rng(seed)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            arr[..., 0 if c == "cats" else 2] = 230
            PIL.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_ema_warms_up_from_the_live_weights():
    from neptune_app.train import EMA
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.98)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay 0.1
    torch.testing.assert_close(ema.state["weight"], 0.1 * init["weight"] + 0.9 * model.weight)
    for _ in range(500):
        ema.update(model)
    assert ema.current_decay() == 0.98


def test_a_short_run_on_a_small_folder_evaluates_warm_weights(tmp_path):
    root = colour_folder(tmp_path / "imgs", per_class=15, size=16, seed=0)
    out = tmp_path / "run"
    proc = neptune("train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "16", "--out",
                   str(out), "--epochs", "5", "--no-progress")
    m = json.loads((out / "metrics.json").read_text())
    assert "test (EMA weights)" in proc.stdout
    # Two classes told apart by colour alone: the live weights learn it within the run; a
    # cold EMA (decay 0.98 from the random init over ~15 steps) scored at chance here.
    assert m["history"][-1]["train_accuracy"] == 1.0
    assert m["test_accuracy"] >= 0.8, m["history"]


# ------------------------------------------------------------------ conventions
def test_cli_conventions(trained, tmp_path):
    out, _ = trained
    from neptune_ext import __version__
    assert neptune("--version").stdout.strip() == f"neptune_ext {__version__}"
    helptext = neptune("train", "--help").stdout
    assert "(default 64; with --resume, the run's" in helptext and "(default 0.003; with --resume" in helptext
    assert "default 0; with --resume, the run's own" in " ".join(helptext.split())
    assert "(default: None)" not in helptext
    env = dict(os.environ, PYTHONPATH=ROOT)
    mod = subprocess.run([sys.executable, "-m", "neptune_app", "info", "--json"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert mod.returncode == 0 and json.loads(mod.stdout)["neptune_ext"] == __version__
    # A finished run is not overwritten by accident.
    again = neptune("train", "--out", str(out), "--epochs", "1", "--limit", "50", check=False)
    assert again.returncode == 2 and "--force" in again.stderr and "--resume" in again.stderr
    # metrics.json says how the run was made.
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["seed"] == 0 and m["run"]["lr"] == 0.003 and m["run"]["batch_size"] == 64
    assert m["run"]["epochs"] == 1 and m["neptune_ext"] == __version__ and "commit" in m


def test_non_terminal_output_has_no_escape_codes(tmp_path):
    proc = neptune("train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--epochs", "2",
                   "--limit", "100")  # no --no-progress: stdout/stderr are pipes here
    text = proc.stdout + proc.stderr
    assert "\x1b[" not in text and "\r" not in text
    assert "epoch 2/2:" in proc.stdout


def test_eval_of_a_folder_checkpoint_finds_its_data(tmp_path):
    root = colour_folder(tmp_path / "imgs", per_class=10, size=12, seed=1)
    out = tmp_path / "run"
    neptune("train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "12", "--out",
            str(out), "--epochs", "1", "--no-progress")
    ev = neptune("eval", "--checkpoint", str(out / "checkpoint.pt"))  # no --dataset, no --data-dir
    assert "folder: test accuracy" in ev.stdout


def test_quiet_prints_the_result_only(tmp_path):
    proc = neptune("-q", "train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--epochs", "2",
                   "--limit", "100")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("test accuracy") and "after 2 epochs" in lines[0]
    assert not proc.stderr.strip()


def test_mixed_precision_training_on_the_cpu(tmp_path):
    proc = neptune("train", "--dataset", "digits", "--out", str(tmp_path / "r"), "--epochs", "6",
                   "--limit", "800", "--amp")
    assert "autocast bf16" in proc.stdout
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["run"]["amp"] == "bf16" and m["test_accuracy"] >= 0.7, m["history"][-1]
    bad = neptune("train", "--out", str(tmp_path / "f"), "--amp", "fp16", check=False)
    assert bad.returncode == 2 and "--amp fp16 needs --device cuda" in bad.stderr


def test_help_and_version_do_not_import_torch():
    env = dict(os.environ, PYTHONPATH=ROOT)
    code = ("import sys, neptune_app.cli\n"
            "try:\n    neptune_app.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    from neptune_app import options
    from neptune_app.data import DATASETS
    assert options.DATASETS == DATASETS


def test_workers_give_the_same_run_for_any_number_of_processes(tmp_path):
    hist = []
    for w in ("1", "2"):
        neptune("-q", "train", "--dataset", "digits", "--out", str(tmp_path / w), "--epochs", "2",
                "--limit", "300", "--workers", w)
        m = json.loads((tmp_path / w / "metrics.json").read_text())
        assert m["run"]["workers"] == int(w)
        hist.append([(h["train_loss"], h["test_loss"]) for h in m["history"]])
    assert hist[0] == hist[1]


@pytest.mark.parametrize("layout, match", [
    ("unreadable-first", "is not a readable image"),  # the image that decides the channels
    ("two-per-class", "too few for its test split"),
    ("one-class", "needs at least two class sub-folders with images, found 1"),
    ("empty-test", "holds no images"),
])
def test_folder_data_sets_that_cannot_train_say_why(layout, match, tmp_path):
    root = tmp_path / "data"
    if layout == "unreadable-first":
        _folder_of(root / "train", ["a", "b"])
        _folder_of(root / "test", ["a", "b"])
        (root / "train" / "a" / "0.png").write_text("junk")
    elif layout == "two-per-class":
        _folder_of(root, ["a", "b"], n=2)
    elif layout == "one-class":
        _folder_of(root, ["a"], n=5)
    else:
        _folder_of(root / "train", ["a", "b"])
        (root / "test" / "a").mkdir(parents=True)
        (root / "test" / "b").mkdir()
    proc = neptune("train", "--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "o"),
                   "--epochs", "1", "--no-progress", check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and match in err[0], proc.stderr


def test_weights_of_another_model_say_what_differs():
    """A checkpoint whose tensors do not fit the model it describes: the error names the
    mismatches (load_state_dict's detail lines, not only its header)."""
    from neptune_app.checkpoint import _load_weights
    from neptune_app.data import DatasetError
    state = {"weight": torch.zeros(5, 3), "bias": torch.zeros(4), "extra": torch.zeros(1)}
    with pytest.raises(DatasetError) as info:
        _load_weights(torch.nn.Linear(3, 4), state, "x.pt")
    msg = str(info.value)
    assert "another model configuration" in msg and "\n" not in msg
    assert 'Unexpected key(s) in state_dict: "extra"' in msg and "size mismatch for weight" in msg


def test_an_interrupted_run_resumed_is_the_uninterrupted_run(tmp_path, monkeypatch):
    """Ctrl-C after an epoch's checkpoint, then --resume: the same weights, to the bit, as a
    run never interrupted (the checkpoint keeps torch's own random state, which draws the
    attention dropout's seeds, beside the data order's generator). Resuming with another
    --lr, --batch-size, --limit, --seed or --amp than the run's is refused, naming them."""
    import neptune_app.train as tr
    kw = dict(epochs=3, limit=160, batch_size=32, progress=False, quiet=True)
    tr.train("digits", str(tmp_path / "whole"), **kw)
    real_save, saves = tr.save_torch, []

    def interrupting_save(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(tr, "save_torch", interrupting_save)
    with pytest.raises(KeyboardInterrupt):
        tr.train("digits", str(tmp_path / "cut"), **kw)
    monkeypatch.setattr(tr, "save_torch", real_save)
    with pytest.raises(tr.DatasetError, match=r"started with --batch-size 32, --lr 0.003; --batch-size 7, "
                                              r"--lr 0.1 would not continue"):
        tr.train("digits", str(tmp_path / "cut"), resume=True, lr=0.1, batch_size=7, progress=False)
    with pytest.raises(tr.DatasetError, match=r"started with --workers 0; --workers 2 would not continue"):
        tr.train("digits", str(tmp_path / "cut"), resume=True, workers=2, progress=False)
    tr.train("digits", str(tmp_path / "cut"), resume=True, progress=False, quiet=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert cut["epoch"] == whole["epoch"] == 3 and cut["run"] == whole["run"]
    for part in ("model", "train_model"):
        for k, v in whole[part].items():
            assert torch.equal(cut[part][k], v), (part, k)
    assert cut["history"][-1]["test_accuracy"] == whole["history"][-1]["test_accuracy"]
