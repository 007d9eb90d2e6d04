"""Train the modality router after stage 2: the one recipe of tools/train_router.py and the
demo pipeline.

1. Prompts: each labelled record's first question as the model reads it before answering
   (system line, `USER: <image>\n{q} ASSISTANT:`, never the answer), with its image when the
   model has a vision tower (training preprocessing, as stage 3 will see it).
2. Features: the frozen dense model's hidden states, mean over the embeddings and every
   layer's output, then over positions (the authors' pooling).
3. Split: a seeded shuffle, `held_out_fraction` held out (at least one sample per class).
4. Fit `Linear(hidden, num_modalities)` with cross-entropy: Adam, lr 1e-2, 100 epochs,
   batch 16. (The authors train 10 epochs at 1e-3 on Phi-2's features; on the tiny demo model
   that stays near chance, so one recipe that converges on both is kept.)

Modality names are sorted, so the expert order is the same on every run (the authors built it
from a Python set) and travels with the weights in the router file. With a number of experts
other than the number of modalities, the classes are the experts' domains (router/domains.py:
sub-domains of a modality by k-means on the training split's features, or groups of
modalities), and the file records which experts each modality reaches.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from medmoe_mcore.checkpoint import store
from medmoe_mcore.config.model import ParallelConfig
from medmoe_mcore.data.encoding import encode_prompt
from medmoe_mcore.data.images import load_image, preprocess
from medmoe_mcore.data.records import SkipRecord
from medmoe_mcore.router import domains as expert_domains
from medmoe_mcore.router.file import RouterWeights
from medmoe_mcore.runtime.parallel import device


@dataclass(frozen=True)
class RouterRecipe:
    epochs: int = 100
    lr: float = 1e-2
    batch_size: int = 16
    held_out_fraction: float = 0.2
    seed: int = 0


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


def pooled_features(model, samples) -> torch.Tensor:
    """Pooled features, one (token ids, image tensor or None) sample at a time (no padding);
    `model` is the multimodal MedMoEModel or a text-only LanguageModel."""
    device = next(model.parameters()).device
    model.eval()
    multimodal = hasattr(model, "language_model")

    def run(sample):
        ids, image = sample
        tokens = torch.tensor([ids], device=device)
        if multimodal:
            images = image.unsqueeze(0).to(device, next(model.parameters()).dtype) \
                if image is not None else None
            model(tokens, images)
        else:
            model(tokens, torch.arange(len(ids), device=device).unsqueeze(0), None)

    decoder = model.language_model.decoder if multimodal else model.decoder
    return _pooled(decoder, run, samples)


def router_samples(records, tok, cfg) -> tuple[list, list[str], Counter]:
    """(samples, modality names, skipped counts) from (record, image bytes or None) pairs:
    records without a modality, a question, or (for a multimodal model) an image are skipped,
    counted by reason."""
    samples, names, skipped = [], [], Counter()
    for record, image in records:
        if not record.get("modality"):
            skipped["no modality"] += 1
            continue
        try:
            ids = encode_prompt(record, tok, with_image=cfg.vision is not None)
        except (SkipRecord, KeyError, TypeError, AttributeError):  # no usable user turn
            skipped["no question"] += 1
            continue
        pixels = None
        if cfg.vision is not None:
            if image is None:
                skipped["no image"] += 1
                continue
            if isinstance(image, list):  # the router learns from one image per question
                skipped["several images"] += 1
                continue
            pixels = preprocess(load_image(image, name=str(record.get("id"))), cfg.vision,
                                train=True)
        samples.append((ids, pixels))
        names.append(record["modality"])
    return samples, names, skipped


def train_router(model, samples, names: list[str], recipe: RouterRecipe = RouterRecipe(),
                 num_experts: int | None = None) -> tuple[RouterWeights, dict]:
    """The recipe above for `num_experts` experts (default: one per modality); returns the
    router and its held-out report (accuracy over experts and over modalities, per class,
    silhouette, split sizes, the experts' domains)."""
    modalities = sorted(set(names))
    if len(modalities) < 2:
        raise ValueError(f"router training needs at least 2 modalities, found {modalities}")
    features = pooled_features(model, samples)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(recipe.seed))
    n_test = max(len(modalities), int(len(names) * recipe.held_out_fraction))
    test, train = order[:n_test], order[n_test:]
    missing = sorted(set(names) - {names[i] for i in train})
    if missing:
        raise ValueError(f"modalities {missing} have no sample left for training after the "
                         f"held-out split: label more samples of them")
    domains = expert_domains.plan(features[train], [names[i] for i in train],
                                  num_experts or len(modalities), recipe.seed)
    labels = domains.labels(features, names)
    router = fit_router(features[train], labels[train], domains.experts, recipe)
    if domains.experts != modalities:
        router = dataclasses.replace(router, domains=domains.by_modality)
    report = evaluate(router, features[test], labels[test])
    predicted = (features[test] @ router.weight.T + router.bias).argmax(-1).tolist()
    report["modality_accuracy"] = sum(
        p in domains.by_modality[names[i]] for p, i in zip(predicted, test.tolist())) / len(test)
    report.update(train=len(train), held_out=len(test), modalities=modalities,
                  experts=domains.experts, domains=domains.by_modality)
    return router, report


def train_from_checkpoint(folder, records, tok, num_experts: int | None = None,
                          recipe: RouterRecipe = RouterRecipe()) -> tuple[RouterWeights, dict,
                                                                          Counter]:
    """The recipe on a dense checkpoint's model (built at the process groups' layout, TP = 1)
    and (record, image bytes or None) pairs: (router, report, records skipped by reason).
    Every rank computes the same; the caller writes the file."""
    from medmoe_mcore.models.medmoe import build_model  # models import nothing of router/

    cfg = store.read_config(folder, ParallelConfig())
    samples, names, skipped = router_samples(records, tok, cfg)
    model = build_model(cfg, perform_initialization=False, parallel_output=False).to(device())
    store.load_into(model, folder)
    router, report = train_router(model, samples, names, recipe, num_experts)
    return router, report, skipped


def fit_router(features: torch.Tensor, labels: torch.Tensor, modalities: list[str],
               recipe: RouterRecipe = RouterRecipe()) -> RouterWeights:
    gen = torch.Generator().manual_seed(recipe.seed)
    linear = torch.nn.Linear(features.shape[1], len(modalities))
    with torch.no_grad():
        torch.nn.init.normal_(linear.weight, std=0.02, generator=gen)
        linear.bias.zero_()
    opt = torch.optim.Adam(linear.parameters(), lr=recipe.lr)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(features), generator=gen)
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
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
