import os
import zlib

import pytest
import torch

# Deterministic-but-fresh randomness: each test run draws a new base seed (printed
# in the header, override with NEPTUNE_TEST_SEED) so inputs are fresh every run yet
# any failure can be replayed.
_SEED = int(os.environ.get("NEPTUNE_TEST_SEED", torch.seed() % 2**31))


def pytest_report_header(config):
    return f"neptune_ext test seed: NEPTUNE_TEST_SEED={_SEED}"


def pytest_terminal_summary(terminalreporter):
    # Skips, one line per reason (not one per test location).
    reasons = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"skipped {n}: {reason}")
    # The seed also at the end, where `pytest -q` (which hides the header) shows it.
    terminalreporter.write_line(f"neptune_ext test seed: NEPTUNE_TEST_SEED={_SEED} (set it to replay this run)")


@pytest.fixture(autouse=True)
def _seed_everything(request):
    torch.manual_seed(_SEED + zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cuda_param(*values):
    """pytest.param for the CUDA device, marked so it is skipped without a GPU."""
    return pytest.param(*values, marks=pytest.mark.cuda)


DEVICES = ["cpu", cuda_param("cuda")]


def same_bits_across_thread_counts(fn):
    """Runs fn() (a sequence of tensors) at the current thread count, at 1, at least 2 and
    at the current count again, and asserts every run gives the same bits."""
    threads = torch.get_num_threads()
    results = []
    for n in (threads, 1, max(threads, 2), threads):
        torch.set_num_threads(n)
        try:
            results.append(list(fn()))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
