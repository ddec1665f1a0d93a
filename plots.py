"""The pictures the scripts draw (PNG), where a person would rather look than read: a run's loss curve,
a Q-Former's caption-image similarity grid, and where an answer looked in its image.
"""

import json
import os

import numpy as np
import torch

from processing import load_image


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed); imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run: str):
    """loss.png: training loss per step and validation loss, from log.jsonl."""
    plt = pyplot()
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=os.path.basename(os.path.abspath(run)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(run, "loss.png"), dpi=100)
    plt.close(fig)


def similarity_grid(sim, texts, captions, samples, path: str, n: int = 8) -> str:
    """A PNG of the similarity of n captions (rows) and n images (columns, one per caption, shown
    above the grid): the diagonal is each caption's own image."""
    plt = pyplot()
    rows = texts[:n]
    cols = [captions.index(t) for t in rows]  # an image of each caption
    grid = sim[cols][:, [texts.index(t) for t in rows]].t().numpy()  # (n captions, n images)
    fig, axes = plt.subplots(2, 1, figsize=(1.2 * n + 3, 1.2 * n + 2.5), gridspec_kw={"height_ratios": [1, n]})
    axes[0].imshow(np.concatenate([np.array(load_image(samples[c]["images"][0]).resize((64, 64))) for c in cols], 1))
    axes[0].axis("off")
    axes[1].imshow(grid, cmap="viridis")
    axes[1].set_yticks(range(len(rows)), rows)
    axes[1].set_xticks(range(len(cols)), [f"image {i + 1}" for i in range(len(cols))], rotation=45)
    for i in range(len(rows)):
        for j in range(len(cols)):
            axes[1].text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    axes[1].set_title("cosine similarity: captions (rows) x images (columns)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_picture(heat, on_image: float, processor, pixel_values, answer: str, path: str, title: str = ""):
    """generate.py --attention: a PNG of the image (the last tile of pixel_values) as the model saw it,
    and the same image under `heat`, the answer's attention per patch (generate.image_attention)."""
    plt = pyplot()
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    picture = (pixel_values[-1].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax in axes:
        ax.imshow(picture)
        ax.axis("off")
    H, W = picture.shape[:2]
    shade = axes[1].imshow(heat.cpu().numpy(), cmap="inferno", alpha=0.5, extent=(0, W, H, 0),
                           interpolation="nearest")
    fig.colorbar(shade, ax=axes[1], fraction=0.046, label="share of the image's attention")
    fig.suptitle(f"{title}\nanswer: {answer!r}   ({on_image:.0%} of its attention on image tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
