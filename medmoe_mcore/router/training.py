"""Train the modality router after stage 2 (the authors' recipe): run the frozen dense model on
labelled prompts, pool hidden states (mean over layers, then over positions), and fit
`Linear(hidden, num_modalities)` with cross-entropy (Adam, lr 1e-3, 10 epochs).

Modality names are sorted, so the expert order is the same on every run (the authors built it
from a Python set) and travels with the weights in the router file.
"""

from __future__ import annotations

import torch

from medmoe_mcore.router.file import RouterWeights


@torch.no_grad()
def _pooled(decoder, run, inputs) -> torch.Tensor:
    """[N, hidden]: per input, `run(input)` once; the mean over the decoder's input (the
    embeddings, images spliced in) and every layer's output (HF's `hidden_states`), then the
    mean over all positions."""
    outputs: list[torch.Tensor] = []
    hooks = [decoder.register_forward_pre_hook(
        lambda m, a, k: outputs.append(k["hidden_states"] if "hidden_states" in k else a[0]),
        with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
              for layer in decoder.layers]
    feats = []
    try:
        for item in inputs:
            outputs.clear()
            run(item)
            stacked = torch.stack([o.float() for o in outputs])  # [L+1, S, 1, H]
            feats.append(stacked.mean(dim=0).mean(dim=0).squeeze(0).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(feats)


def pooled_features(model, token_lists: list[list[int]]) -> torch.Tensor:
    """Pooled features of the text-only LanguageModel, one token list per sample."""
    device = next(model.parameters()).device
    model.eval()

    def run(ids):
        tokens = torch.tensor([ids], device=device)
        model(tokens, torch.arange(len(ids), device=device).unsqueeze(0), None)

    return _pooled(model.decoder, run, token_lists)


def fit_router(features: torch.Tensor, labels: torch.Tensor, modalities: list[str],
               epochs: int = 10, lr: float = 1e-3, batch_size: int = 16,
               seed: int = 0) -> RouterWeights:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(features.shape[1], len(modalities))
    with torch.no_grad():
        torch.nn.init.normal_(linear.weight, std=0.02, generator=gen)
        linear.bias.zero_()
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(linear(features[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return RouterWeights(linear.weight.detach().clone(), linear.bias.detach().clone(),
                         list(modalities))


def evaluate(router: RouterWeights, features: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = features @ router.weight.T + router.bias
    pred = logits.argmax(-1)
    per_class = {name: (pred[labels == i] == i).float().mean().item()
                 for i, name in enumerate(router.modalities) if (labels == i).any()}
    return {"accuracy": (pred == labels).float().mean().item(), "per_class": per_class,
            "silhouette": silhouette(logits, labels)}


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette coefficient (Euclidean) of points `x` [N, D] under `labels`."""
    if len(labels.unique()) < 2:
        return float("nan")
    d = torch.cdist(x.double(), x.double())
    scores = []
    for i in range(len(x)):
        same = labels == labels[i]
        same[i] = False
        if not same.any():
            scores.append(0.0)
            continue
        a = d[i, same].mean()
        b = min(d[i, labels == c].mean() for c in labels.unique() if c != labels[i])
        scores.append(((b - a) / max(a, b)).item())
    return float(sum(scores) / len(scores))


def pooled_multimodal_features(model, batches) -> torch.Tensor:
    """Pooled features of the multimodal model, one sample per batch (no padding)."""
    model.eval()

    def run(batch):
        if batch["input_ids"].shape[0] != 1:
            raise ValueError("pooled_multimodal_features takes one sample per batch")
        model(batch["input_ids"], batch["images"])

    return _pooled(model.language_model.decoder, run, batches)
