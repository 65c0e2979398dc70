"""torchvision's ResNet-18 with every Conv2d->BatchNorm2d(->ReLU) chain fused."""
import torch.nn as nn

from neptune_ext.nn import fuse_stages


def resnet18_fused(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """ResNet-18 (random init; no weights are downloaded) with its stages fused.

    It trains exactly like the eager model (batch statistics, the fused BN+ReLU
    kernel) and, after ``model.eval()``, runs with every BN folded into its conv;
    its state dict is torchvision's.
    """
    from torchvision.models import resnet18
    model = resnet18(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.train()
    fused = fuse_stages(model, inplace=True)
    fused.config = {"num_classes": num_classes, "in_channels": in_channels}
    return fused
