"""Neptune: an image classifier that treats an image as a graph of feature-map nodes.

    image --Stage stem--> feature map [B, D, h, w] --> B*h*w nodes
    per block: edges = k nearest neighbours in feature space (per image, recomputed
               per block) + the spatial 8-neighbourhood, batched as one
               block-diagonal graph;  x = x + GAT(LN(x));  x = x + MLP(LN(x))
    head:      LayerNorm -> mean over the image's nodes -> Linear

Graph construction is batched tensor work: no Python loop over images or nodes.
"""
from typing import Sequence

import torch
import torch.nn as nn

from neptune_ext.graph import Graph
from neptune_ext.nn import GraphAttention, Stage


def spatial_edges(h: int, w: int, device=None) -> torch.Tensor:
    """Edges j -> i between each grid cell i and its (up to) 8 neighbours j: [2, E]."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    src, dst = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            ny, nx = ys + dy, xs + dx
            ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            src.append((ny * w + nx)[ok])
            dst.append((ys * w + xs)[ok])
    return torch.stack([torch.cat(src), torch.cat(dst)])


def knn_edges(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [B, n, D] -> edges j -> i from the k nearest neighbours j of every node i
    (Euclidean, same image, excluding i itself), as block-diagonal ids [2, B*n*k]."""
    B, n, _ = x.shape
    k = min(k, n - 1)
    if k <= 0:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    with torch.no_grad():
        d = torch.cdist(x, x)
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        nbr = d.topk(k, dim=-1, largest=False).indices  # [B, n, k]
    offset = (torch.arange(B, device=x.device) * n).view(B, 1, 1)
    src = (nbr + offset).reshape(-1)
    dst = (torch.arange(n, device=x.device).view(1, n, 1) + offset).expand(B, n, k).reshape(-1)
    return torch.stack([src, dst])


def batch_graph(x: torch.Tensor, k: int, spatial: torch.Tensor) -> torch.Tensor:
    """kNN edges of every image plus the shared spatial edges, block-diagonal: [2, E]."""
    B, n, _ = x.shape
    offset = (torch.arange(B, device=x.device) * n).view(1, B, 1)
    sp = (spatial.unsqueeze(1) + offset).reshape(2, -1)
    return torch.cat([knn_edges(x, k), sp], dim=1)


class GraphBlock(nn.Module):
    """Pre-norm residual block: graph attention, then a feed-forward MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, attn_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width ({dim}) must be divisible by heads ({heads})")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GraphAttention(dim, dim // heads, heads=heads, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        """edge_index: [2, E] (self loops are added as GATConv does) or a Graph (used as is)."""
        x = x + self.attn(self.norm1(x), edge_index)
        return x + self.mlp(self.norm2(x))


class Neptune(nn.Module):
    """Image classifier over a graph of feature-map nodes.

    Args:
        num_classes: number of classes.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        image_size: input height = width; the stem downsamples (stride 2) until the
            feature map is at most ``max_grid`` on a side.
        width: node feature size D.
        stem_channels: channels of the Stage blocks before the last one (which outputs D).
        blocks, heads, k: graph blocks, attention heads, kNN neighbours per node.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 8, width: int = 64,
                 stem_channels: Sequence[int] = (32,), blocks: int = 3, heads: int = 4, k: int = 8,
                 max_grid: int = 8, mlp_ratio: int = 2, attn_dropout: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.config = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                           width=width, stem_channels=list(stem_channels), blocks=blocks, heads=heads,
                           k=k, max_grid=max_grid, mlp_ratio=mlp_ratio, attn_dropout=attn_dropout,
                           dropout=dropout)
        chans = [in_channels] + list(stem_channels) + [width]
        size = image_size
        stem = []
        for i in range(len(chans) - 1):
            stride = 2 if size > max_grid else 1
            stem.append(Stage(chans[i], chans[i + 1], 3, stride=stride, padding=1))
            size = (size + 2 - 3) // stride + 1
        while size > max_grid:  # more downsampling for large images
            stem.append(Stage(width, width, 3, stride=2, padding=1))
            size = (size + 2 - 3) // 2 + 1
        self.stem = nn.Sequential(*stem)
        self.grid = size
        self.k = k
        self.pos = nn.Parameter(torch.zeros(1, size * size, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(GraphBlock(width, heads, mlp_ratio, attn_dropout, dropout)
                                    for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.register_buffer("spatial", spatial_edges(size, size), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.config["in_channels"]:
            raise ValueError(f"images must be [B, {self.config['in_channels']}, H, W], got {list(images.shape)}")
        f = self.stem(images)  # [B, D, h, w]
        B, D, h, w = f.shape
        if h * w != self.pos.shape[1]:
            raise ValueError(f"images of size {tuple(images.shape[2:])} give a {h}x{w} feature map; "
                             f"this model was built for image_size={self.config['image_size']}")
        x = f.flatten(2).transpose(1, 2) + self.pos  # [B, n, D]
        n = h * w
        # Our edges never contain self loops (kNN excludes i, the 8-neighbourhood too), so the
        # loops GATConv would add are appended here and the layer gets a ready Graph: no
        # per-call id validation (a host sync on CUDA) and no loop-removal bookkeeping.
        loops = torch.arange(B * n, device=x.device).expand(2, -1)
        for block in self.blocks:
            edge_index = torch.cat([batch_graph(x.detach(), self.k, self.spatial), loops], dim=1)
            graph = Graph.from_edge_index(edge_index, (B * n, B * n))
            x = block(x.reshape(B * n, D), graph).view(B, n, D)
        return self.head(self.norm(x).mean(dim=1))
