"""A whole training step of each attention layer over a static graph, captured in a CUDA graph
and replayed, and under torch.compile(mode="reduce-overhead"); attention dropout refused
inside a capture (a drawn seed would be baked into the graph). Skipped without a GPU."""
import pytest
import torch

import neptune_ext
from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer

pytestmark = pytest.mark.cuda

LAYERS = [GraphAttention, GraphAttentionV2, GraphTransformer]


@pytest.fixture(autouse=True)
def _require_cuda_kernels():
    if (neptune_ext._ext._C is None or "cuda" not in neptune_ext._ext.compiled_backends()
            or not torch.cuda.is_available()):
        pytest.skip("the CUDA kernels are not built")


def _problem(cls, **kw):
    torch.manual_seed(0)
    n = 500
    x = torch.randn(n, 32, device="cuda")
    ei = torch.randint(0, n, (2, 4000), device="cuda")
    return cls(32, 16, heads=4, **kw).cuda(), x, ei


@pytest.mark.parametrize("cls", LAYERS)
def test_training_step_captured_and_replayed(cls):
    model, x, ei = _problem(cls)

    def step():
        loss = model(x, ei).square().mean()
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: lazy init, the graph cache, cuBLAS handles
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    eager_loss = step()
    eager = [p.grad.clone() for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for p, want in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


def test_compile_reduce_overhead():
    # one layer: a compile takes tens of seconds, and the GPU check's test step is capped
    model, x, ei = _problem(GraphAttention)
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):
        out = compiled(x, ei)
        out.square().mean().backward()
    torch.testing.assert_close(compiled(x, ei), model(x, ei), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_dropout_inside_capture_is_refused(cls):
    model, x, ei = _problem(cls, dropout=0.5)
    model.train()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(x, ei)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CUDA graph capture"):
        with torch.cuda.graph(graph):
            model(x, ei)
    model.eval()  # eval mode has no dropout: captures
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        model(x, ei)
