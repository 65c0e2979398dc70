"""Sparse graph attention: one family of ops, each a spec plus its math - GATConv's,
GATv2Conv's and TransformerConv's attention, and TransformerConv's again with its edge
features projected inside (``transformer_edge_attention``).

    spec.py              what every variant's op shares: validation outside compiled code,
                         dropout seeds, the kernel-or-reference decision, fake kernels and
                         autograd registered once from an ``AttentionSpec``
    gat.py, gatv2.py,    each variant's op (``neptune_ext.ops.*``): its argument checks,
    transformer.py       its spec, its weights op (transformer.py: both transformer ops)
    reference.py         pure-PyTorch references (test oracle and fallback)
    layer.py             the layers' base (PyG's ``MessagePassing`` when PyG is installed),
                         input parsing, the cached kernel graph, the output head
    projection.py        the layers' node projections (``neptune::linear``: oneDNN's float32
                         matmul on the CPU where it applies, else the Linear itself)
    self_loops.py        GATConv's self-loop semantics over a plain ``Graph``
    gat_layer.py, gatv2_layer.py, transformer_layer.py
                         GraphAttention, GraphAttentionV2, GraphTransformer
                         (``neptune_ext.nn.*``)

Importing this package imports nothing; the layer modules import PyG when it is installed.
"""
