"""The whole-CNN benchmark runs end to end (on the CPU here; its figures come from GPUs)."""
import json

import pytest

pytest.importorskip("torchvision")


def test_gpu_cnn_benchmark_smoke_run_on_cpu(tmp_path, capsys):
    from neptune_app.bench import gpu_cnn
    out = tmp_path / "cnn.json"
    gpu_cnn.main(["--device", "cpu", "--models", "resnet18", "--batch", "2", "--size", "32",
                  "--rounds", "1", "--reps", "1", "--no-compile", "--json", str(out)])
    report = json.loads(out.read_text())
    inf = report["inference"]["resnet18"]
    assert set(inf) == {"fp32", "bf16", "bf16-autocast"}
    for prec, r in inf.items():
        assert set(r["results"]) == {"eager", "fx_fold", "fuse_stages"}
        assert r["fusions"] == 20 and "autograd" not in r["stage_paths_per_forward"]
        tol = 1e-5 if prec == "fp32" else 5e-2
        assert r["results"]["fuse_stages"]["rel_err_vs_eager_fp32"] < tol
    train = report["training"]
    assert set(train) == {"stage_stack_4x3x3_c64", "resnet18"}
    stack = train["stage_stack_4x3x3_c64"]
    for prec in ("fp32", "bf16-autocast"):
        assert stack[prec]["results"]["fuse_stages"]["memory_vs_eager"] <= 0.7
    assert "training step, resnet18, bf16-autocast" in capsys.readouterr().out


def test_gpu_cnn_benchmark_rejects_bad_arguments(capsys):
    from neptune_app.bench import gpu_cnn
    with pytest.raises(SystemExit):
        gpu_cnn.main(["--device", "cpu", "--precisions", "fp8"])
    assert "--precisions: unknown ['fp8']" in capsys.readouterr().err


def test_gpu_cnn_layer_benchmark_smoke_run_on_cpu(tmp_path):
    from neptune_app.bench import gpu_cnn
    out = tmp_path / "layers.json"
    gpu_cnn.main(["--device", "cpu", "--models", "resnet18", "--batch", "1", "--size", "32",
                  "--rounds", "1", "--reps", "1", "--no-compile", "--no-training",
                  "--precisions", "fp32", "--layers", "--json", str(out)])
    layers = json.loads(out.read_text())["layers"]
    assert layers["model"] == "resnet18" and len(layers["layers"]) == 11  # distinct convs
    row = layers["layers"][0]
    assert row["in"] == 3 and row["kernel"] == [7, 7] and row["ours_conv_bias_relu_ms"] > 0
