"""The modules' names before the layout by concept (see CHANGELOG): ``neptune_ext.nn.stage`` is now
``neptune_ext.stage.module``, ``neptune_ext.ops.graph_attention`` is
``neptune_ext.attention.gat``, and so on (the table below). An old name still imports, as
the very module of its new name, for one release: code that imports it keeps working, and a
model pickled with ``torch.save(model)`` before the move still loads (a pickle names its
classes by module). Importing an old name warns (DeprecationWarning)."""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

OLD_NAMES = {  # old name -> module
    "neptune_ext.ops.attention_spec": "neptune_ext.attention.spec",
    "neptune_ext.ops.graph_attention": "neptune_ext.attention.gat",
    "neptune_ext.ops.gatv2": "neptune_ext.attention.gatv2",
    "neptune_ext.ops.transformer": "neptune_ext.attention.transformer",
    "neptune_ext.reference": "neptune_ext.attention.reference",
    "neptune_ext.nn._gat_graph": "neptune_ext.attention.self_loops",
    "neptune_ext.nn._attention": "neptune_ext.attention.layer",
    "neptune_ext.nn.graph_attention": "neptune_ext.attention.gat_layer",
    "neptune_ext.nn.gatv2": "neptune_ext.attention.gatv2_layer",
    "neptune_ext.nn.transformer": "neptune_ext.attention.transformer_layer",
    "neptune_ext.ops.stage": "neptune_ext.stage.functional",
    "neptune_ext.ops.stage_activations": "neptune_ext.stage.activations",
    "neptune_ext.ops.stage_bn_relu": "neptune_ext.stage.bn_relu",
    "neptune_ext.ops.stage_capabilities": "neptune_ext.stage.capabilities",
    "neptune_ext.ops.stage_checks": "neptune_ext.stage.checks",
    "neptune_ext.ops.stage_cutlass": "neptune_ext.stage.cutlass",
    "neptune_ext.ops.stage_eval": "neptune_ext.stage.eval",
    "neptune_ext.ops.stage_eval_paths": "neptune_ext.stage.paths",
    "neptune_ext.ops.stage_train": "neptune_ext.stage.train",
    "neptune_ext.ops.fold_cache": "neptune_ext.stage.fold_cache",
    "neptune_ext.reference_stage": "neptune_ext.stage.reference",
    "neptune_ext.nn.stage": "neptune_ext.stage.module",
    "neptune_ext.nn.stage_autocast": "neptune_ext.stage.autocast",
    "neptune_ext.nn.stage_dispatch": "neptune_ext.stage.dispatch",
    "neptune_ext.nn.stage_passthrough": "neptune_ext.stage.passthrough",
    "neptune_ext.nn.stage_running_stats": "neptune_ext.stage.running_stats",
    "neptune_ext.nn.stage_state_dict": "neptune_ext.stage.state_dict",
    "neptune_ext.nn.stage_training": "neptune_ext.stage.batch_stats",
    "neptune_ext.nn.fuse": "neptune_ext.stage.fuse.model",
    "neptune_ext.nn.fuse_block": "neptune_ext.stage.fuse.block",
    "neptune_ext.nn.fuse_checks": "neptune_ext.stage.fuse.checks",
    "neptune_ext.nn.fuse_layout": "neptune_ext.stage.fuse.layout",
    "neptune_ext.nn.fuse_patterns": "neptune_ext.stage.fuse.patterns",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(f"{spec.name} is now {self.target}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # the target module ran when it was imported


class _OldNames(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        new = OLD_NAMES.get(name)
        return None if new is None else importlib.util.spec_from_loader(name, _Alias(new))


def install() -> None:
    """Resolve the old names (after every other finder: a real module always wins)."""
    if not any(isinstance(f, _OldNames) for f in sys.meta_path):
        sys.meta_path.append(_OldNames())
