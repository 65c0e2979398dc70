"""Models: Neptune (an image classifier over a graph of feature-map nodes) and
resnet18_fused (torchvision's ResNet-18 with its Conv-BN-ReLU stages fused)."""
from .neptune import Neptune, batch_graph, knn_edges, spatial_edges
from .resnet import resnet18_fused

__all__ = ["Neptune", "resnet18_fused", "batch_graph", "knn_edges", "spatial_edges"]
