"""Pictures of expert use (paper Fig. 4-5), with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def expert_heatmap(counts: torch.Tensor, layer_numbers: list[int], modalities: list[str],
                   path, title: str = "Expert activation",
                   expert_names: list[str] | None = None) -> Path:
    """One panel per modality: share of its (image + text) tokens' routing assignments per
    MoE layer (rows) and expert (columns, named by `expert_names`: the router's classes);
    a last panel: each modality's top-1 expert per layer. Modalities without tokens are
    left out. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medmoe_mcore.models.moe.stats import shares

    share = shares(counts).numpy()  # [layer, modality, expert]
    present = [m for m in range(len(modalities)) if np.isfinite(share[:, m]).all()]
    if not present:
        raise ValueError("no image or text token was counted: nothing to draw")
    layers, experts = share.shape[0], share.shape[2]
    labels = [f"{e} {n}" for e, n in enumerate(expert_names)] if expert_names else \
        [str(e) for e in range(experts)]
    width = 1.2 + 0.55 * experts
    fig, axes = plt.subplots(1, len(present) + 1, squeeze=False,
                             figsize=(width * len(present) + 0.6 * len(present) + 1.5,
                                      1.8 + 0.35 * layers))
    axes = axes[0]
    for ax, m in zip(axes, present):
        image = ax.imshow(share[:, m], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(modalities[m], fontsize=9)
        ax.set_xticks(range(experts), labels, fontsize=7, rotation=45 if expert_names else 0,
                      ha="right" if expert_names else "center")
        ax.set_yticks(range(layers), [str(n) for n in layer_numbers], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    axes[0].set_ylabel("MoE layer", fontsize=8)
    fig.colorbar(image, ax=list(axes[:len(present)]), fraction=0.03, pad=0.02, label="share of tokens")
    top = share[:, present].argmax(axis=-1)  # [layer, modality]
    ax = axes[-1]
    ax.imshow(top, cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for (row, col), expert in np.ndenumerate(top):
        ax.text(col, row, str(expert), ha="center", va="center", fontsize=7, color="white")
    ax.set_title("top-1 expert", fontsize=9)
    ax.set_xticks(range(len(present)), [modalities[m] for m in present], rotation=45,
                  ha="right", fontsize=7)
    ax.set_yticks(range(layers), [str(n) for n in layer_numbers], fontsize=7)
    fig.suptitle(title, fontsize=10, y=1.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
