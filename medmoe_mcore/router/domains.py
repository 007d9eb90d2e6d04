"""Expert domains for any expert count: which class of labelled samples each expert of a
modality router is trained to receive, when the number of experts E differs from the number
of modalities M.

- E == M: one modality per expert (the paper's router).
- E > M: each modality gets E // M experts, and the E % M left over go to the modalities with
  the most samples (ties: name order). A modality with n experts is split into n sub-domains by
  k-means on its pooled stage-2 features (the same features the router reads), so each expert
  keeps one modality and a region of that modality's feature space. Experts `CT.1`, `CT.2`, ...
- E < M: the modalities' feature centroids are merged, closest pair first (Euclidean, centroid
  of a group = mean of its samples), until E groups remain. Experts `CT+MRI`, ...

The router is then trained as an E-way classifier on those labels (router/training.py), and
the router file records `domains`: modality -> its experts. k-means is written here (seeded
k-means++ start, Lloyd steps, ~20 lines of torch) rather than taken from scikit-learn: it
would be the project's only use of that library, and the labels must not move with its
version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Domains:
    """experts: expert names (index = expert); by_modality: modality -> its experts;
    centroids: per expert, the feature centroid a sample of that modality is matched to
    (None for whole modalities)."""

    experts: list
    by_modality: dict
    centroids: dict

    def labels(self, features: torch.Tensor, modalities: list[str]) -> torch.Tensor:
        """Each sample's expert: its modality's, or the nearest of its modality's centroids."""
        out = []
        for feature, modality in zip(features, modalities):
            experts = self.by_modality[modality]
            if len(experts) == 1:
                out.append(experts[0])
            else:
                dist = torch.stack([(feature - self.centroids[e]).norm() for e in experts])
                out.append(experts[int(dist.argmin())])
        return torch.tensor(out)


def plan(features: torch.Tensor, modalities: list[str], num_experts: int,
         seed: int = 0) -> Domains:
    """The domains of `num_experts` experts for samples with these features and modalities."""
    names = sorted(set(modalities))
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: must be >= 1")
    index = {m: [i for i, n in enumerate(modalities) if n == m] for m in names}
    if num_experts >= len(names):
        return _split(features, index, num_experts, seed)
    return _group(features, index, num_experts)


def _split(features, index: dict, num_experts: int, seed: int) -> Domains:
    names = list(index)
    counts = dict.fromkeys(names, num_experts // len(names))
    by_size = sorted(names, key=lambda m: (-len(index[m]), m))
    for m in by_size[:num_experts % len(names)]:
        counts[m] += 1
    experts, by_modality, centroids = [], {}, {}
    for m in names:
        n = counts[m]
        if len(index[m]) < n:
            raise ValueError(f"modality {m!r} has {len(index[m])} labelled samples for {n} "
                             f"experts: at least one sample per expert is needed")
        by_modality[m] = list(range(len(experts), len(experts) + n))
        if n == 1:
            experts.append(m)
            continue
        centres = kmeans(features[index[m]], n, seed)
        for j, centre in enumerate(centres):
            centroids[len(experts)] = centre
            experts.append(f"{m}.{j + 1}")
    return Domains(experts, by_modality, centroids)


def _group(features, index: dict, num_experts: int) -> Domains:
    groups = [[m] for m in index]
    while len(groups) > num_experts:
        means = [features[[i for m in g for i in index[m]]].mean(0) for g in groups]
        pairs = [(float((means[a] - means[b]).norm()), a, b)
                 for a in range(len(groups)) for b in range(a + 1, len(groups))]
        _, a, b = min(pairs)
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    groups.sort()
    return Domains(["+".join(g) for g in groups],
                   {m: [e] for e, g in enumerate(groups) for m in g}, {})


def kmeans(x: torch.Tensor, k: int, seed: int = 0, steps: int = 50) -> torch.Tensor:
    """[k, D] centres: k-means++ start from a seeded generator, then Lloyd steps; a centre
    left without points restarts at the point farthest from its centre."""
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(len(x), (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        centres.append(x[int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))]
                       if d2.sum() > 0 else x[len(centres)])
    centres = torch.stack(centres)
    for _ in range(steps):
        dist = torch.cdist(x, centres)
        assign = dist.argmin(dim=1)
        new = centres.clone()
        for j in range(k):
            members = x[assign == j]
            new[j] = members.mean(0) if len(members) else x[int(dist.min(1).values.argmax())]
        if torch.equal(new, centres):
            break
        centres = new
    return centres.float()
