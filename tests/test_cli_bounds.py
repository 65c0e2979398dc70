"""The `neptune` command under interrupts and hostile arguments (issue 20, items 9 and 10):
every file is written atomically, bad bounds and crafted checkpoints are one line and exit
2 before any work. The command runs in this process (neptune_app.cli.main) on tiny data."""
import json
import os
import types

import pytest
import torch

import neptune_app.cli
from neptune_app import _io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "digits", "--limit", "32", "--batch-size", "32", "--no-progress"]


def neptune(capsys, *args):
    """(exit status, stdout, stderr) of `neptune ARGS`, run in this process."""
    capsys.readouterr()
    try:
        code = neptune_app.cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse: bad arguments
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, out, err, match):
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err and "internal error" not in err


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 1-epoch run of 32 digits (about a second): checkpoint, metrics and plots."""
    out = tmp_path_factory.mktemp("base")
    code = neptune_app.cli.main(["-q", "train", "--out", str(out), "--epochs", "1", *TINY])
    assert code == 0
    return out


def copy_run(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def snapshot(run):
    return {f: (run / f).read_bytes() for f in os.listdir(run)}


# ------------------------------------------------------------------ item 9: atomic writes
def test_atomic_write_keeps_the_old_file_on_any_exception(tmp_path):
    target = tmp_path / "f.json"
    _io.write_json(target, {"a": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)  # umask, not 0600
    for exc in (KeyboardInterrupt(), RuntimeError("disk full")):
        with pytest.raises(type(exc)):
            with _io.atomic_write(target, "w") as f:
                f.write('{"a": 2, "b": ')
                raise exc
        assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["f.json", "plain"]  # no temporary file left
    _io.write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 3}


def _interrupting(write_partial):
    """A writer that writes part of its output to the open file, then gets Ctrl-C."""
    def writer(obj, f, *args, **kwargs):
        write_partial(f)
        raise KeyboardInterrupt
    return writer


@pytest.mark.parametrize("victim", ["checkpoint", "metrics", "plot"])
def test_ctrl_c_during_a_write_keeps_the_last_complete_epoch(victim, base_run, tmp_path, capsys, monkeypatch):
    run = copy_run(base_run, tmp_path / "run")
    before = snapshot(run)
    with monkeypatch.context() as m:
        if victim == "checkpoint":
            m.setattr(torch, "save", _interrupting(lambda f: f.write(b"PK\x03\x04" + b"\0" * 4096)))
        elif victim == "metrics":
            m.setattr(_io, "json", types.SimpleNamespace(dump=_interrupting(lambda f: f.write('{"model": '))))
        else:
            from matplotlib.figure import Figure
            m.setattr(Figure, "savefig", lambda self, f, **kw: _interrupting(
                lambda f: f.write(b"\x89PNG\r\n\x1a\n"))(None, f))
        code, out, err = neptune(capsys, "train", "--out", run, "--resume", "--epochs", "2", *TINY)
    assert code == 130 and "continue with --resume" in err, (code, err)
    after = snapshot(run)
    assert set(after) == set(before), "a temporary file was left behind"
    ck = torch.load(run / "checkpoint.pt", weights_only=True)  # whole, and loads
    # The file being written when Ctrl-C came is the previous one, byte for byte.
    changed = {f for f in before if after[f] != before[f]}
    assert {"checkpoint": "checkpoint.pt", "metrics": "metrics.json", "plot": "training_curve.png"}[victim] \
        not in changed
    assert ck["epoch"] == (1 if victim == "checkpoint" else 2)
    assert json.loads((run / "metrics.json").read_text())["epochs"] == (1 if victim != "plot" else 2)
    # --resume continues from the last complete epoch (or, all done, writes the record again).
    code, out, err = neptune(capsys, "train", "--out", run, "--resume", "--epochs", "2", *TINY)
    assert code == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 2 and [h["epoch"] for h in m["history"]] == [1, 2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_every_file_the_commands_write_goes_through_the_atomic_helper():
    """No plain writes left in the modules that write the commands' files."""
    import re
    files = ["neptune_app/cli.py", "neptune_app/train.py", "neptune_app/sampled.py", "neptune_app/options.py",
             "examples/sampled_gat.py", "neptune_app/bench/suite.py", "neptune_app/bench/common.py",
             "neptune_app/bench/scaling.py", "neptune_app/bench/drawn_digits.py"]
    plain = re.compile(r"open\([^)]*['\"][wa]b?['\"]|torch\.save\(|\.savefig\(|json\.dump\(")
    for f in files:
        with open(os.path.join(ROOT, f)) as fh:
            for i, line in enumerate(fh, 1):
                if plain.search(line) and "os.devnull" not in line and "/proc/" not in line and not line.lstrip().startswith("#"):
                    raise AssertionError(f"{f}:{i} writes a file directly: {line.strip()}")


# ------------------------------------------------------------------ item 10: bounds
@pytest.mark.parametrize("args,match", [
    (["--dataset", "folder", "--data-dir", "{tmp}", "--image-size", "100000"],
     "--image-size: expected an integer from 1 to 512, got 100000"),
    (["--dataset", "digits", "--image-size", "16"], "--image-size applies to --dataset folder only"),
    (["--workers", "10000"], "--workers: expected an integer from 0 to 32, got 10000"),
    (["--workers", "-1"], "--workers: expected an integer from 0 to 32, got -1"),
    (["--lr", "1e300"], "--lr: expected a positive finite number at most 1, got 1e300"),
    (["--lr", "inf"], "--lr: expected a positive finite number"),
    (["--seed", str(2**70)], f"--seed: expected an integer from 0 to 4294967295, got {2**70}"),
    (["--seed", "-1"], "--seed: expected an integer from 0 to 4294967295, got -1"),
    (["--resume", "--force"], "argument --force: not allowed with argument --resume"),
])
def test_train_bounds_are_one_line_and_exit_2(args, match, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = neptune(capsys, "train", "--out", tmp_path / "o", *args)
    one_line_error(code, out, err, match)
    assert not out and not os.path.exists(tmp_path / "o" / "checkpoint.pt")


def test_bench_refuses_a_plot_format_matplotlib_cannot_write_before_any_work(tmp_path, capsys, monkeypatch):
    """`neptune bench --plot x.txt` ran the whole suite and then failed with an internal
    error, losing its --json results: now one line and exit 2 before the suite starts."""
    import neptune_app.bench.suite as suite
    monkeypatch.setattr(suite, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    code, out, err = neptune(capsys, "bench", "--quick", "--plot", tmp_path / "x.txt",
                             "--json", tmp_path / "b.json")
    one_line_error(code, out, err, "matplotlib cannot write .txt files; use one of:")
    assert ".png" in err and not os.path.exists(tmp_path / "b.json")


def test_bench_keeps_its_json_whatever_the_plot_does(tmp_path, monkeypatch):
    """The suite writes its --json before drawing the plot: a plot that fails (a full disk,
    a broken backend) does not lose the results."""
    import neptune_app.bench.graph_attention as graph_attention
    import neptune_app.bench.scaling as scaling
    import neptune_app.bench.stage as stage
    import neptune_app.bench.suite as suite
    import neptune_app.bench.user_graphs as user_graphs

    def failing_plot(*a, **k):
        raise OSError("no space left on device")
    monkeypatch.setattr(scaling, "scaling_plot", failing_plot)
    # the sections stubbed: their results, instantly
    monkeypatch.setattr(graph_attention, "run_benchmark", lambda *a, **k: {"stub": 1})
    monkeypatch.setattr(user_graphs, "run_case", lambda *a, **k: {"stub": 1})
    monkeypatch.setattr(stage, "run", lambda *a, **k: {"stub": 1})
    monkeypatch.setattr(suite, "bench_neptune_model", lambda *a, **k: {
        "neptune (reference ops)": {"train_step": 1.0, "inference": 1.0}})
    with pytest.raises(OSError):
        suite.run_suite("cpu", True, str(tmp_path / "b.json"), str(tmp_path / "p.png"))
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["graph_attention"] == {"stub": 1} and "environment" in report


def test_train_help_states_the_bounds(capsys):
    with pytest.raises(SystemExit):
        neptune_app.cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("1 to 512", "0 to 32", "at most 1", "0 to 4294967295"):
        assert words in text, words


def _three_epoch_run(base_run, run):
    """base_run's checkpoint relabelled as a finished 3-epoch run, with its metrics."""
    run.mkdir()
    ck = torch.load(base_run / "checkpoint.pt", weights_only=True)
    h = ck["history"][0]
    ck.update(epoch=3, epochs=3, history=[dict(h, epoch=e) for e in (1, 2, 3)])
    torch.save(ck, run / "checkpoint.pt")
    (run / "metrics.json").write_text(json.dumps({"epochs": 3, "history": ck["history"]}))
    return run


def test_resume_with_fewer_epochs_than_done_is_refused(base_run, tmp_path, capsys):
    run = _three_epoch_run(base_run, tmp_path / "run")
    before = snapshot(run)
    code, out, err = neptune(capsys, "train", "--out", run, "--resume", "--epochs", "1", *TINY)
    one_line_error(code, out, err, "already holds 3 epochs; --epochs 1 would train nothing")
    assert not out and snapshot(run) == before  # the record is kept


def _corrupt(ck, path, value):
    """ck with the field at `path` (dotted) set to value."""
    *parents, last = path.split(".")
    d = ck
    for p in parents:
        d = d[p]
    d[last] = value
    return ck


CRAFTED = [  # (field, value, words in the message)
    ("data.image_size", [-8, -8], "data.image_size must be [S, S]"),
    ("data.image_size", [100000, 100000], "data.image_size must be [S, S] with 1 <= S <= 512"),
    ("model_name", ["neptune"], "model_name must be 'neptune' or 'resnet18'"),
    ("data.scale", None, "data.scale must be a positive number"),
    ("data.mean", [0.1, 0.2, 0.3], "data.mean must be 1 numbers"),
    ("data.std", [0.0], "data.std must be 1 positive numbers"),
    ("data.classes", "0123456789", "data.classes must be a list"),
    ("data.channels", "1", "data.channels must be 1 or 3"),
    ("data.dataset", 7, "data.dataset must be one of"),
    ("data", None, "data must be a dict"),
    ("model_config", [1, 2], "model_config must be a dict"),
    ("model_config.width", "64", "model_config.width must be integers from 1 to 4096"),
    ("model_config.width", 10**9, "model_config.width must be integers from 1 to 4096"),
    ("model_config.dropout", float("nan"), "model_config.dropout must be numbers in [0, 1)"),
    ("model", {"pos": 3}, "model must be a dict of named tensors"),
    ("epoch", "1", "epoch must be a positive integer"),
    ("history", None, "history must be a list of 1 per-epoch records"),
    ("generator", None, "generator must be a generator state"),
    ("seconds", float("inf"), "seconds must be a non-negative number"),
]


@pytest.mark.parametrize("field,value,words", CRAFTED, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CRAFTED])
def test_a_checkpoint_with_fields_of_the_wrong_type_is_not_a_neptune_checkpoint(
        field, value, words, base_run, tmp_path, capsys):
    ck = _corrupt(torch.load(base_run / "checkpoint.pt", weights_only=True), field, value)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ck, run / "checkpoint.pt")
    training_only = field.split(".")[0] in ("epoch", "history", "generator", "seconds")
    commands = [["train", "--out", run, "--resume", *TINY]]
    if not training_only:
        (tmp_path / "d.png").write_bytes(b"")  # never read: the checkpoint is refused first
        commands += [["eval", "--checkpoint", run / "checkpoint.pt"],
                     ["predict", tmp_path / "d.png", "--checkpoint", run / "checkpoint.pt"]]
    for args in commands:
        code, out, err = neptune(capsys, *args)
        one_line_error(code, out, err, "is not a neptune checkpoint")
        assert words in err and not out, (args[0], err)
