"""fuse_stages conformance: a zoo of hand-written blocks that do what users' models do (in-place
ops on the identity and the conv input, ``x += ...`` into the caller's tensor, aliased inputs,
views written in place, attributes set in forward, hooks and pre-hooks on conv/BN/ReLU,
shared modules, residual tails), each fused in train and in eval mode and compared with the
unfused original in float64: outputs, the caller's tensors after the call, attributes set in
forward, hook calls (module, kind, values), input and parameter gradients (train; or the same
autograd error where the original raises one), running statistics. Each block also pins what
was fused and what was left unfused (``fusion_skipped``), so a rewrite that starts taking a
block it must not take fails here even where the numbers happen to agree.

The whole product (blocks x {train, eval}) runs: ~20 blocks, two calls each, in seconds."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neptune_ext
from neptune_app.bench.stage import randomize_bn

C = 4


def conv_bn(c=C):
    return nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)


class Tail(nn.Module):
    """conv -> bn, added to an identity: the base of the residual blocks below."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()
        self.relu = nn.ReLU(inplace=True)


# --- writes into the identity or the conv input between the conv and the add ---------------

class ReluInplaceIdentity(Tail):
    def forward(self, x):
        out = self.bn(self.conv(x))
        x = torch.relu_(x)
        return out + x


class MulInplaceIdentity(Tail):
    def forward(self, x):
        out = self.bn(self.conv(x))
        x.mul_(2)
        return out + x


class FunctionalInplaceFlag(Tail):
    def forward(self, x):
        out = self.bn(self.conv(x))
        y = F.relu(x, True)  # inplace=True by position
        return out + y


class SetItemIdentity(Tail):
    def forward(self, x):
        out = self.bn(self.conv(x))
        x[:, 0] = 0.0
        return self.relu(out + x)


class ViewWrittenInPlace(Tail):
    def forward(self, x):
        v = x.view(x.shape[0], -1)
        out = self.bn(self.conv(x))
        v.add_(1.0)
        return out + x


class IdentityWrittenAfterTail(Tail):
    """The identity is written after the tail: eager's add keeps nothing for backward, a
    fused training tail keeps the identity (an autograd error in backward if it ran)."""

    def forward(self, x):
        h = x * 2
        out = self.relu(self.bn(self.conv(h)) + x)
        x.mul_(0.5)
        return out * 2


# --- augmented assignments: torch.fx records them out of place ------------------------------

class AugAssignIntoInput(Tail):
    def forward(self, x):
        x += self.bn(self.conv(x))
        return x


class AugAssignReadLater(Tail):
    def forward(self, x):
        y = x * 2
        alias = y
        y += self.bn(self.conv(x))
        return y * alias


class ParentReusesInput(nn.Module):
    """The caller of a block that writes into its input reads that input again."""

    def __init__(self):
        super().__init__()
        self.block = AugAssignIntoInput()

    def forward(self, x):
        y = self.block(x)
        return y + x


# --- aliased inputs ---------------------------------------------------------------------------

class TwoInputs(Tail):
    """Called with ``y`` a view of ``x``: the write into ``y`` changes the identity."""

    def forward(self, x, y):
        out = self.bn(self.conv(x))
        y.mul_(3)
        return self.relu(out + x)


# --- attributes set in forward ------------------------------------------------------------------

class StoresOutput(Tail):
    def forward(self, x):
        out = self.relu(self.bn(self.conv(x)) + x)
        self.feat = out
        return out


class StoresIntermediate(Tail):
    """Stores the BN's output: a fused chain would store the ReLU's."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        self.pre = y
        return F.relu(y)


class AppendsToList(Tail):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y)
        return self.relu(self.bn(y))


class StoresChildOutput(nn.Module):
    """Sets an attribute in forward, but the chains live in a child: their outputs are the
    child's, which fusion does not change (fused; the parent's code is kept)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*conv_bn(), nn.ReLU())

    def forward(self, x):
        y = self.a(x)
        self.feat = y
        return y * 2


class Counts(Tail):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.relu(self.bn(self.conv(x)) + x)


# --- blocks that must fuse (positive controls) -------------------------------------------------

class BasicTail(Tail):
    """ResNet's: ``out += identity`` into the BN's own output, shared in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = conv_bn()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn(self.conv(out))
        out += x
        return self.relu(out)


class InplaceActOnSum(Tail):
    def forward(self, x):
        out = self.bn(self.conv(x)) + x
        return out.relu_()


class WriteBeforeConv(Tail):
    """A write into the input before the conv reads it: order kept by the fused tail."""

    def forward(self, x):
        x.mul_(0.5)
        return self.relu(self.bn(self.conv(x)) + x)


class Shared(nn.Module):
    """One conv+BN registered and called twice (left alone), a shared ReLU, a tail block
    called twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()
        self.relu = nn.ReLU()
        self.tail = InplaceActOnSum()
        self.again = self.conv

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.tail(self.tail(x))
        return self.relu(self.bn(self.again(x)))


# --- hooks ---------------------------------------------------------------------------------------

class Hooked(nn.Module):
    """Three chains and a tail; hooks are added per case (see HOOKS)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*conv_bn(), nn.ReLU())
        self.b = nn.Sequential(*conv_bn(), nn.ReLU())
        self.c = nn.Sequential(*conv_bn(), nn.ReLU())
        self.tail = BasicTail()

    def forward(self, x):
        return self.tail(self.c(self.b(self.a(x))))


def add_hooks(model, log):
    """Forward hook on a BN, pre-hook on a conv, forward hook on a ReLU, a hook on the
    tail's BN; each records (name, kind, values)."""
    def record(name, kind):
        def hook(module, args, out=None):
            log.append((name, kind, [t.detach().clone() for t in (args if out is None else (out,))
                                     if isinstance(t, torch.Tensor)]))
        return hook
    model.a[1].register_forward_hook(record("a.1", "forward"))
    model.b[0].register_forward_pre_hook(record("b.0", "pre"))
    model.c[2].register_forward_hook(record("c.2", "forward"))
    model.tail.bn.register_forward_hook(record("tail.bn", "forward"))


# (block, input shapes, fused report, substrings of the fusion_skipped lines, call kwargs maker)
ZOO = {
    "relu_inplace_identity": (ReluInplaceIdentity, ["conv+bn -> Conv+BN"], ["conv+bn+add", "relu_ on x"]),
    "mul_inplace_identity": (MulInplaceIdentity, ["conv+bn -> Conv+BN"], ["mul_ on x"]),
    "functional_inplace_flag": (FunctionalInplaceFlag, ["conv+bn -> Conv+BN"], ["relu on x"]),
    # (torch.fx cannot trace ``x[i] = v``: the block is left whole, silently, as any
    # untraceable code; mutated_args still counts operator.setitem as a write)
    "setitem_identity": (SetItemIdentity, [], []),
    "view_written_in_place": (ViewWrittenInPlace, ["conv+bn -> Conv+BN"], ["add_ on view"]),
    "identity_written_after_tail": (IdentityWrittenAfterTail, ["conv+bn -> Conv+BN"], ["mul_ on x"]),
    "augassign_into_input": (AugAssignIntoInput, ["conv+bn -> Conv+BN"], ["'x += ...' may write into an input"]),
    "augassign_read_later": (AugAssignReadLater, ["conv+bn -> Conv+BN"], ["a tensor read later"]),
    "parent_reuses_input": (ParentReusesInput, ["block.conv+bn -> Conv+BN"], ["may write into an input"]),
    "two_inputs_aliased": (TwoInputs, ["conv+bn -> Conv+BN"], ["mul_ on y"]),
    "stores_output": (StoresOutput, [], ["sets self.feat"]),
    "stores_intermediate": (StoresIntermediate, [], ["sets self.pre"]),
    "appends_to_list": (AppendsToList, [], ["self.seen.append"]),
    "counts_calls": (Counts, [], ["self.calls"]),
    "stores_child_output": (StoresChildOutput, ["a.0+1+2 -> Stage"], []),
    "basic_tail": (BasicTail, ["conv1+bn1+relu -> Stage", "conv+bn+add+relu -> Stage+residual"], []),
    "inplace_act_on_sum": (InplaceActOnSum, ["conv+bn+add+relu_ -> Stage+residual"], []),
    "write_before_conv": (WriteBeforeConv, ["conv+bn+add+relu -> Stage+residual"], []),
    "shared": (Shared, ["tail.conv+bn+add+relu_ -> Stage+residual"],
               ["conv+bn -> unfused: the conv or its BN is called, or held, at more than one place"]),
    "hooked": (Hooked, ["c.0+1 -> Conv+BN", "tail.conv1+bn1+relu -> Stage"],
               ["a.0+1+2 -> unfused: forward hooks on a.1", "b.0+1+2 -> unfused: forward pre-hooks on b.0",
                "c.0+1+2 -> activation not fused: forward hooks on c.2",
                "tail.conv+bn+add+relu -> unfused: forward hooks on tail.bn"]),
}


def call(model, x, name):
    if name == "two_inputs_aliased":
        return model(x, x[:, :2])  # y: a view of x
    return model(x)


def attributes(model):
    """Tensors (and lists of tensors, counters) that forward stored on the modules."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k in ("feat", "pre", "seen", "calls"):
                out[f"{name}.{k}"] = v
    return out


def assert_same(got, want, what):
    if isinstance(want, dict):
        assert set(got) == set(want), what
        for k in want:
            assert_same(got[k], want[k], f"{what}: {k}")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), (what, type(got))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{what}[{i}]")
    else:
        assert got == want, what


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_fused_block_behaves_as_the_original(name, train):
    torch.manual_seed(0)  # the zoo's parameters: fixed, so the report and values are the same every run
    make, report, skipped = ZOO[name]
    model = randomize_bn(make().double()).train(train)
    eager = copy.deepcopy(model)
    logs = {"fused": [], "eager": []}
    if name == "hooked":
        add_hooks(model, logs["fused"]), add_hooks(eager, logs["eager"])
    fused = neptune_ext.fuse_stages(model, inplace=True)
    assert sorted(fused.fusion_report) == sorted(report)
    for want_line in skipped:
        assert any(want_line in line for line in fused.fusion_skipped), (want_line, fused.fusion_skipped)
    if not skipped:
        assert fused.fusion_skipped == []
    assert_same(attributes(fused), attributes(eager), "attributes before a call")  # no stale Proxy
    for step in range(2):
        x0 = torch.randn(2, C, 5, 5, dtype=torch.float64, requires_grad=train)
        xe0 = x0.detach().clone().requires_grad_(train)
        x, xe = x0 * 1.0, xe0 * 1.0  # (non-leaf: the blocks may write into them)
        y, ye = call(fused, x, name), call(eager, xe, name)
        assert_same(y, ye, "output")
        assert_same(x, xe, "the caller's tensor after the call")
        assert_same(attributes(fused), attributes(eager), "attributes set in forward")
        assert [(n, k) for n, k, _ in logs["fused"]] == [(n, k) for n, k, _ in logs["eager"]]
        assert_same([v for _, _, v in logs["fused"]], [v for _, _, v in logs["eager"]], "hook values")
        if train:
            g = torch.randn_like(ye)
            try:
                ye.backward(g)
            except RuntimeError as e:  # the original's own autograd error (an in-place write)
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    y.backward(g)
                assert "modified by an inplace operation" in str(e)
                continue
            y.backward(g)
            assert_same(x0.grad, xe0.grad, "input gradient")
            for (pname, p), pe in zip(fused.named_parameters(), eager.parameters()):
                assert_same(p.grad, pe.grad, f"gradient of {pname}")
            fused.zero_grad(), eager.zero_grad()
        for (bname, b), be in zip(fused.named_buffers(), eager.buffers()):
            assert_same(b, be, f"buffer {bname}")


def test_fusion_skipped_is_printed_with_verbose(capsys):
    neptune_ext.fuse_stages(ReluInplaceIdentity().eval(), verbose=True)
    out = capsys.readouterr().out
    assert "1 fusion(s), 1 left unfused" in out and "conv+bn+add -> unfused: relu_ on x" in out


def test_global_module_hooks_leave_everything_unfused():
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(m))
    try:
        fused = neptune_ext.fuse_stages(BasicTail().eval())
    finally:
        handle.remove()
    assert fused.fusion_report == [] and "global module hooks" in fused.fusion_skipped[0]


def test_tracing_leaves_no_proxy_in_a_model_fused_in_place():
    model = StoresOutput().eval()
    model.feat = "before"
    neptune_ext.fuse_stages(model, inplace=True)
    assert model.feat == "before"
    model(torch.randn(1, C, 4, 4))
    assert isinstance(model.feat, torch.Tensor)
