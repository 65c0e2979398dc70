"""The Stage's path report: the dispatch returns the path it took with the output, each
module keeps its latest path on itself (``last_path``; ``stage_paths`` reads the modules),
nothing is recorded under torch.compile, and the process-wide tally of evaluation
convolutions (``neptune_ext.info()``'s ``stage_eval_paths``) counts what ran."""
import torch
import torch.nn as nn

import neptune_ext
from neptune_ext.nn import Stage, stage_paths
from neptune_ext.stage.dispatch import stage_forward
from neptune_ext.stage.paths import EVAL_PATHS, eval_path_counts, reset_eval_path_counts


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_the_dispatch_returns_the_path_and_the_module_keeps_it():
    stage = Stage(3, 8, 3, padding=1).train()
    x = torch.randn(2, 3, 6, 6)
    out, path = stage_forward(stage.conv, stage.bn, x, True, None, "relu", None)
    assert path == "bn-relu-kernel" and out.shape == (2, 8, 6, 6)
    assert stage.last_path is None  # the dispatch records nothing itself
    stage(x)
    assert stage.last_path == "bn-relu-kernel" and stage_paths(stage) == {"": "bn-relu-kernel"}
    stage.eval()
    with torch.no_grad():
        stage(x)
    assert stage.last_path in EVAL_PATHS


def test_modules_of_one_thread_keep_their_own_paths():
    training, evaluating = Stage(3, 8, 3).train(), Stage(3, 8, 3).eval()
    x = torch.randn(2, 3, 6, 6)
    training(x)
    with torch.no_grad():
        evaluating(x)
    assert training.last_path == "bn-relu-kernel"
    assert evaluating.last_path in EVAL_PATHS


def test_nothing_is_recorded_under_torch_compile():
    fused = neptune_ext.fuse_stages(_model().eval())
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 7, 7)
    reset_eval_path_counts()
    with torch.no_grad():
        got = compiled(x)
    assert set(stage_paths(fused).values()) == {None}
    assert eval_path_counts() == {}
    with torch.no_grad():
        torch.testing.assert_close(got, fused(x), rtol=1e-4, atol=1e-5)
    assert set(stage_paths(fused).values()) <= EVAL_PATHS and eval_path_counts()


def test_the_tally_counts_each_evaluation_convolution_once():
    fused = neptune_ext.fuse_stages(_model().eval())
    reset_eval_path_counts()
    with torch.no_grad():
        fused(torch.randn(1, 3, 7, 7))
        fused(torch.randn(1, 3, 7, 7))  # (the second call may replay the first's oneDNN call)
    assert sum(eval_path_counts().values()) == 4
    from neptune_ext.info import info_dict
    assert info_dict()["stage_eval_paths"] == eval_path_counts()
