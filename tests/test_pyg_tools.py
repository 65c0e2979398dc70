"""The attention layers where PyG accepts GATConv / GATv2Conv / TransformerConv: to_hetero, HeteroConv,
torch_geometric.explain (GNNExplainer) - same results as PyG's layers with the same weights."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import HeteroData  # noqa: E402
from torch_geometric.nn import GATConv, GATv2Conv, HeteroConv, MessagePassing, TransformerConv, to_hetero  # noqa: E402

PAIRS = [(GATConv, GraphAttention), (GATv2Conv, GraphAttentionV2), (TransformerConv, GraphTransformer)]
IDS = ["GATConv", "GATv2Conv", "TransformerConv"]


def no_loops(conv):
    """add_self_loops=False for the layers that have it (TransformerConv adds none)."""
    return {} if conv in (TransformerConv, GraphTransformer) else {"add_self_loops": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hetero_data():
    data = HeteroData()
    data["paper"].x = torch.randn(30, 8, dtype=torch.float64)
    data["author"].x = torch.randn(20, 6, dtype=torch.float64)
    writes = torch.stack([torch.randint(0, 20, (60,)), torch.randint(0, 30, (60,))])
    data["author", "writes", "paper"].edge_index = writes
    data["paper", "cites", "paper"].edge_index = torch.randint(0, 30, (2, 80))
    data["paper", "rev_writes", "author"].edge_index = writes.flip(0)
    return data


class TwoLayers(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv1 = conv((-1, -1), 16, heads=2, **no_loops(conv))
        self.conv2 = conv((-1, -1), 4, heads=1, **no_loops(conv))

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=IDS)
def test_layers_are_message_passing(theirs, ours):
    assert isinstance(ours(4, 2), MessagePassing)


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=IDS)
def test_to_hetero_matches_pyg(theirs, ours):
    data = hetero_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = to_hetero(TwoLayers(theirs), data.metadata(), aggr="sum").double()
        model = to_hetero(TwoLayers(ours), data.metadata(), aggr="sum").double()
    exp = ref(data.x_dict, data.edge_index_dict)  # sizes the lazy layers
    model(data.x_dict, data.edge_index_dict)
    model.load_state_dict(ref.state_dict())
    out = model(data.x_dict, data.edge_index_dict)
    assert sorted(out) == sorted(exp) == ["author", "paper"]  # keyed by node type
    for k in exp:
        torch.testing.assert_close(out[k], exp[k], rtol=1e-10, atol=1e-12)
    go = {k: torch.randn_like(v) for k, v in exp.items()}
    g_ref = torch.autograd.grad(list(exp.values()), list(ref.parameters()), list(go.values()))
    out = model(data.x_dict, data.edge_index_dict)
    g_out = torch.autograd.grad([out[k] for k in exp], list(model.parameters()), list(go.values()))
    for a, b in zip(g_ref, g_out):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=IDS)
def test_hetero_conv_matches_pyg(theirs, ours):
    data = hetero_data()

    def build(conv):
        return HeteroConv({et: conv((-1, -1), 5, heads=2, **no_loops(conv))
                           for et in data.edge_types}, aggr="sum").double()

    ref, model = build(theirs), build(ours)
    exp = ref(data.x_dict, data.edge_index_dict)
    model(data.x_dict, data.edge_index_dict)
    model.load_state_dict(ref.state_dict())
    out = model(data.x_dict, data.edge_index_dict)
    for k in exp:
        torch.testing.assert_close(out[k], exp[k], rtol=1e-10, atol=1e-12)


class NodeNet(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.c1 = conv(6, 8, heads=2)
        self.c2 = conv(16, 3, heads=1)

    def forward(self, x, edge_index):
        return self.c2(self.c1(x, edge_index).relu(), edge_index)


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=IDS)
def test_gnn_explainer_masks_match_pyg(theirs, ours):
    from torch_geometric.explain import Explainer, GNNExplainer
    n = 25
    x = torch.randn(n, 6, dtype=torch.float64)
    ei = torch.randint(0, n, (2, 90))
    ei[:, :3] = torch.arange(3).repeat(2, 1)  # input self loops (removed, then re-added)
    ei[:, 3:9] = torch.stack([torch.arange(10, 16), torch.full((6,), 3)])  # node 3 has in-edges
    ref = NodeNet(theirs).double()
    model = NodeNet(ours).double()
    model.load_state_dict(ref.state_dict())
    masks = []
    for m in (ref, model):
        torch.manual_seed(5)  # the explainer's random mask initialization
        explainer = Explainer(m, GNNExplainer(epochs=30), explanation_type="model",
                              node_mask_type="attributes", edge_mask_type="object",
                              model_config=dict(mode="multiclass_classification", task_level="node",
                                                return_type="raw"))
        e = explainer(x, ei, index=3)
        masks.append((e.edge_mask, e.node_mask))
    assert masks[0][0].abs().max() > 0  # a real explanation
    torch.testing.assert_close(masks[1][0], masks[0][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(masks[1][1], masks[0][1], rtol=1e-6, atol=1e-8)
    # After explaining, the fused path runs again and equals PyG's layer.
    torch.testing.assert_close(model(x, ei), ref(x, ei), rtol=1e-10, atol=1e-12)


def test_import_without_pyg():
    """`import neptune_ext` and both layers work when torch_geometric cannot be imported."""
    code = ("import sys; sys.modules['torch_geometric'] = None\n"
            "import torch, neptune_ext\n"
            "from neptune_ext.nn import GraphAttention, GraphAttentionV2\n"
            "x, ei = torch.randn(10, 4), torch.randint(0, 10, (2, 30))\n"
            "assert GraphAttention(4, 2)(x, ei).shape == (10, 2)\n"
            "assert GraphAttentionV2(4, 2)(x, ei).shape == (10, 2)\n"
            "assert type(GraphAttention(4, 2)).__mro__[1].__name__ == 'AttentionBase'\n"
            "print('ok', [c.__name__ for c in type(GraphAttention(4, 2)).__mro__][:3])\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "'Module'" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=IDS)
def test_edge_index_and_sparse_inputs_match_coo(theirs, ours):
    n = 30
    ei = torch.randint(0, n, (2, 120))
    x = torch.randn(n, 6, dtype=torch.float64)
    model = ours(6, 4, heads=2).double()
    exp = model(x, ei)
    idx = pyg.EdgeIndex(ei, sparse_size=(n, n))
    torch.testing.assert_close(model(x, idx), exp)
    torch.testing.assert_close(model(x, idx.sort_by("col")[0]), model(x, ei[:, torch.argsort(ei[1], stable=True)]))
    ref = theirs(6, 4, heads=2).double()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref(x, idx), exp)


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=IDS)
def test_sorted_inputs_are_used_without_sorting(theirs, ours, monkeypatch):
    """A torch sparse CSR adjacency and an EdgeIndex sorted by destination go to the
    kernels as they are (no COO -> CSR sort), with the same results as COO."""
    import neptune_ext.graph as graph_mod
    n = 40
    ei = torch.randint(0, n, (2, 200))
    ei = ei[:, torch.argsort(ei[1], stable=True)]  # the caller's order = destination order
    x = torch.randn(n, 6, dtype=torch.float64)
    model = ours(6, 4, heads=2, **no_loops(ours)).double()
    exp, (_, a_exp) = model(x, ei, return_attention_weights=True)
    adj = torch.sparse_csr_tensor(*_csr(ei, n), torch.ones(ei.shape[1]), (n, n))
    idx = pyg.EdgeIndex(ei, sparse_size=(n, n), sort_order="col")
    calls = []
    monkeypatch.setattr(graph_mod.Graph, "_build", classmethod(lambda *a: calls.append(1)))
    for inp in (adj, idx):
        out, (_, alpha) = model(x, inp, return_attention_weights=True)
        torch.testing.assert_close(out, exp)
        torch.testing.assert_close(alpha, a_exp)
    assert not calls  # nothing was sorted
    bad = torch.sparse_csr_tensor(*_csr(ei, n), torch.ones(ei.shape[1]), (n, n))
    bad.col_indices()[3] = 10**6
    with pytest.raises(ValueError):
        model(x, bad)


def _csr(ei, n):
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(torch.bincount(ei[1], minlength=n), 0)
    return rowptr, ei[0].clone()


def test_bad_csr_is_a_value_error_also_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    from neptune_ext import Graph
    with pytest.raises(ValueError, match="not a CSR graph"):
        Graph.from_csr(torch.tensor([0, 2, 3]), torch.tensor([0, 7, 1]), 5)
    with pytest.raises(ValueError, match="not a CSR graph"):
        Graph.from_csr(torch.tensor([0, 3, 2]), torch.tensor([0, 1, 1]), 5)
    g = Graph.from_csr(torch.tensor([0, 2, 3]), torch.tensor([4, 0, 1]), 5)
    assert g.edge_index.tolist() == [[4, 0, 1], [0, 0, 1]] and g.num_dst == 2
