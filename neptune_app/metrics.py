"""What `neptune train` and `neptune eval` report: the confusion matrix, per-class precision,
recall and F1, evaluation over a data set, and the plots written beside the checkpoint."""
import os
from typing import Dict, List

import torch
import torch.nn.functional as F

from ._io import save_figure
from .data import ImageData

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(target * k + pred, minlength=k * k).view(k, k)


def per_class_metrics(cm: torch.Tensor, classes: List[str]) -> Dict[str, dict]:
    cm = cm.double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {c: {"precision": round(precision[i].item(), 4), "recall": round(recall[i].item(), 4),
                "f1": round(f1[i].item(), 4), "support": int(cm[i].sum().item())}
            for i, c in enumerate(classes)}


@torch.no_grad()
def evaluate(model, data: ImageData, device, batch_size: int = 256):
    model.eval()
    preds, losses = [], []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx)
        logits = model(x.to(device))
        losses.append(F.cross_entropy(logits, y.to(device), reduction="sum").item())
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    acc = (pred == data.labels).float().mean().item() if len(data) else 0.0
    return {"loss": sum(losses) / max(len(data), 1), "accuracy": acc, "pred": pred}


# ------------------------------------------------------------------- plots
def save_plots(out_dir: str, history: List[dict], cm: torch.Tensor, classes: List[str]) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots")
        return []
    from matplotlib.ticker import MaxNLocator
    paths = []
    ep = [h["epoch"] for h in history]
    mark = "o" if len(ep) <= 12 else None  # a short run's points stay visible
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train", marker=mark)
    a1.plot(ep, [h["test_loss"] for h in history], label="test (EMA weights)", marker=mark)
    a1.set_xlabel("epoch"), a1.set_ylabel("cross-entropy"), a1.legend()
    a1.set_title("loss (train: augmented, label smoothing 0.1)", fontsize=10)
    a2.plot(ep, [h["train_accuracy"] for h in history], label="train", marker=mark)
    a2.plot(ep, [h["test_accuracy"] for h in history], label="test (EMA weights)", marker=mark)
    a2.set_xlabel("epoch"), a2.set_ylabel("accuracy"), a2.legend(), a2.set_title("accuracy")
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "training_curve.png"))
    save_figure(fig, paths[-1], dpi=100)
    plt.close(fig)
    k = len(classes)
    side = max(4.0, 1.0 + 0.5 * k)  # room for the title and labels with few classes
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(k)), ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=90), ax.set_yticklabels(classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title("confusion matrix (test)")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "confusion_matrix.png"))
    save_figure(fig, paths[-1], dpi=100)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------- train
