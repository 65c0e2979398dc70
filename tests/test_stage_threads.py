"""The Stage's path report is per thread: two threads running fused models at the same time
each read back the path their own call took (it was one module-level slot, so a thread could
report the other thread's path, or None)."""
import threading

import torch
import torch.nn as nn

from neptune_ext import fuse_stages, stage_paths

EVAL_PATHS = {"onednn-fused", "onednn+activation", "conv+bias", "autograd"}


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_two_threads_report_their_own_paths():
    torch.manual_seed(0)
    evaluating, training = fuse_stages(_model().eval()), fuse_stages(_model().train())
    # two batch sizes in turn: the evaluating thread's calls take the full path every time
    # (a repeated call of one shape would replay its oneDNN call and set the path directly)
    inputs = [torch.randn(b, 3, 12, 12) for b in (1, 2)]
    seen = {"eval": set(), "train": set()}
    errors = []

    def run(kind):
        try:
            for i in range(150):
                x = inputs[i % 2]
                if kind == "eval":
                    with torch.no_grad():
                        evaluating(x)
                    seen[kind] |= set(stage_paths(evaluating).values())
                else:
                    training(x).sum().backward()
                    seen[kind] |= set(stage_paths(training).values())
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("eval", "train")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen["eval"] and seen["eval"] <= EVAL_PATHS, seen
    assert seen["train"] and not (seen["train"] & EVAL_PATHS) and None not in seen["train"], seen
