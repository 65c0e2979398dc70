"""One place decides kernel vs reference (neptune_ext.backend): every op family asks it,
and NEPTUNE_FORCE_REFERENCE reaches all of them (graph building included)."""
import os

import pytest
import torch

import neptune_ext
from neptune_ext import Graph, backend as _backend, ops

ROOT = os.path.dirname(os.path.abspath(neptune_ext.__file__))


def test_nothing_else_reads_the_switch_or_asks_the_dispatcher():
    offenders = []
    for folder, _, files in os.walk(ROOT):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith((os.sep + "backend.py", "_ext.py")):
                continue
            text = open(path).read()
            if "NEPTUNE_FORCE_REFERENCE\"" in text.replace("'", '"') and "environ" in text \
                    or "_dispatch_has_kernel" in text:
                offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders


@pytest.mark.parametrize("op", ["build_csr", "gat_forward", "gatv2_forward", "bn_relu_forward"])
def test_forced_reference_reaches_every_family(op, monkeypatch):
    if not _backend.registered(op, "cpu"):
        pytest.skip("extension not built")
    assert _backend.runs_kernel(op, "cpu")
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    assert not _backend.runs_kernel(op, "cpu")


def test_forced_reference_builds_graphs_without_the_extension(monkeypatch):
    ei = torch.randint(0, 9, (2, 30))
    want = Graph.from_edge_index(ei, (9, 9))
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    calls = []
    monkeypatch.setattr(torch.ops.neptune, "build_csr", lambda *a: calls.append(a), raising=False)
    g = Graph.from_edge_index(ei, (9, 9))
    assert not calls
    assert torch.equal(g.rowptr, want.rowptr) and torch.equal(g.col, want.col)
    h, s = torch.randn(9, 2, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    torch.testing.assert_close(ops.sparse_graph_attention(h, s, s, g), ops.sparse_graph_attention(h, s, s, want))


def test_the_public_rule_takes_devices_names_ops_and_nests():
    if not _backend.registered("gat_forward", "cpu"):
        pytest.skip("extension not built")
    assert _backend.runs_kernel("gat_forward", torch.device("cpu"))
    assert _backend.kernels_run(torch.device("cpu")) and _backend.kernels_run("cpu")
    assert _backend.kernels_run("cuda") == (torch.cuda.is_available()
                                            and "cuda" in _backend.compiled_backends())
    with pytest.raises(ValueError, match="op"):
        _backend.runs_kernel("no_such_op", "cpu")
    with _backend.force_reference():
        assert not _backend.kernels_run("cpu")
        with _backend.force_reference(False):
            assert _backend.kernels_run("cpu")
        assert not _backend.kernels_run("cpu")
        with pytest.raises(KeyError):
            with _backend.force_reference(False):
                raise KeyError("inside")
        assert not _backend.kernels_run("cpu")
    assert _backend.kernels_run("cpu")
