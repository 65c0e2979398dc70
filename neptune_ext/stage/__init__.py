"""The Stage: Conv2d -> BatchNorm2d (-> + residual) -> activation as one fused layer, and
``fuse_stages``, which finds such chains in any model.

The ops (``neptune_ext.ops.*``):
    functional.py        the public functional ops and the math of both modes
    eval.py              evaluation: BN folded into the convolution, one library call
                         (oneDNN, cuDNN or CUTLASS) that returns the path it took
    paths.py             the names of those paths and the process-wide tally
    fold_cache.py        the fold and the packed weights, cached per source tensor version
    train.py, bn_relu.py batch statistics: conv -> the fused BN+ReLU kernel, recomputing
                         backward; the running-statistics update
    activations.py, checks.py, capabilities.py, cutlass.py
                         the activations, argument checks, what this process's libraries
                         can run, the CUTLASS convolution
    reference.py         pure-PyTorch references (test oracle and fallback)
The modules (``neptune_ext.nn.Stage``, ``stage_paths``):
    module.py            Stage, FusedConv2d, FoldedConv2d, stage_paths
    dispatch.py          which path a call takes (returned, never kept in globals)
    autocast.py, batch_stats.py, running_stats.py, state_dict.py, passthrough.py
                         the autocast policy, the batch-statistics call, the running
                         statistics, state-dict loading, the modules fusing leaves in place
    fuse/                ``fuse_stages`` (model.py), what it matches (patterns.py), what it
                         checks (checks.py), the rewritten residual block (block.py), the
                         caller's memory format (layout.py)

Importing this package imports nothing.
"""
