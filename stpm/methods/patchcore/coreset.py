"""The memory bank: a greedy k-center coreset of the training patch features (on a random projection, in
independent random chunks, so the cost is linear in the number of patches)."""

from __future__ import annotations

import math

import torch

MIN_BANK = 2048  # memory-bank rows kept however small the coreset ratio


def _greedy_batched(z: torch.Tensor, valid: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-center in C independent chunks at once. z: [C, L, d] (rows beyond a chunk's length are
    padding, valid False); -> [C, k] row indices, each the row farthest from those already chosen in its
    chunk. One batched matrix-vector product per step, so small chunks still use the cores well."""
    c, length, _ = z.shape
    zz = (z * z).sum(2)  # [C, L]
    rows = torch.arange(c)
    first = torch.stack([torch.randint(int(n), (1,), generator=g)[0] for n in valid.sum(1)])
    chosen = [first]
    zi = z[rows, first]  # [C, d]
    dist = zz - 2 * torch.bmm(z, zi.unsqueeze(2)).squeeze(2) + zz[rows, first].unsqueeze(1)
    dist[~valid] = -1.0  # padding is never the farthest row
    for _ in range(k - 1):
        i = dist.argmax(dim=1)
        chosen.append(i)
        zi = z[rows, i]
        d = zz - 2 * torch.bmm(z, zi.unsqueeze(2)).squeeze(2) + zz[rows, i].unsqueeze(1)
        torch.minimum(dist, d, out=dist)
        dist[~valid] = -1.0
    return torch.stack(chosen, dim=1)


def _chunks(m: int, groups: torch.Tensor | None, n: int, chunk: int, g: torch.Generator):
    """Shuffled row indices split into chunks of at most `chunk` rows that never mix groups -> (chunks, rows
    wanted of each). A group of m_g rows gets about n * m_g / m of the n rows, spread over its chunks."""
    if groups is None:
        members = [torch.randperm(m, generator=g)]
    else:
        members = [idx[torch.randperm(len(idx), generator=g)] for idx in
                   (torch.nonzero(groups == v).flatten() for v in torch.unique(groups))]
    chunks, wanted = [], []
    for idx in members:
        mg = len(idx)
        parts = math.ceil(mg / chunk)
        n_g = math.ceil(n * mg / m)  # all n when there are no groups (mg == m)
        for c in range(parts):
            chunks.append(idx[c * mg // parts:(c + 1) * mg // parts])
            wanted.append(min(len(chunks[-1]), math.ceil(n_g / parts)))
    return chunks, wanted


def greedy_coreset(
    features: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 64, chunk: int = 16384,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of an approximate greedy k-center coreset of `features` [M, D]: about n rows (at least
    n, rounded up so every chunk gives its share).

    As PatchCore, distances are measured on a random projection to `proj_dim` dims. The patches are
    shuffled into chunks of at most `chunk` rows, each chunk runs its own greedy selection, all chunks
    in lockstep: the cost is O(n * chunk * proj_dim), not O(n * M * proj_dim), and it does not grow with
    the training set. With `groups` (int [M], e.g. each patch's fold of training images) no chunk mixes
    groups, so the rows chosen from the other groups are themselves a coreset of those groups alone: a
    bank without one group's rows is what a fit without that group would have built (cross-fitting).
    Deterministic given `seed`."""
    m = len(features)
    if n < 1:
        raise ValueError(f"coreset size must be >= 1, got {n}")
    if groups is not None and groups.shape != (m,):
        raise ValueError(f"groups must hold one label per row ({m}), got shape {tuple(groups.shape)}")
    if n >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(int(seed))
    d = features.shape[1]
    proj = torch.randn(d, proj_dim, generator=g) / math.sqrt(proj_dim) if d > proj_dim else None
    chunks, wanted = _chunks(m, groups, n, chunk, g)
    length = max(len(c) for c in chunks)
    z = torch.zeros(len(chunks), length, proj_dim if proj is not None else d)
    index = torch.zeros(len(chunks), length, dtype=torch.long)
    valid = torch.zeros(len(chunks), length, dtype=torch.bool)
    for c, idx in enumerate(chunks):
        f = features[idx].float()
        z[c, :len(idx)] = f @ proj if proj is not None else f
        index[c, :len(idx)] = idx
        valid[c, :len(idx)] = True
    picked = _greedy_batched(z, valid, max(wanted), g)  # [C, k]: greedy order, so each chunk keeps a prefix
    keep = torch.arange(picked.shape[1]).unsqueeze(0) < torch.tensor(wanted).unsqueeze(1)
    return torch.unique(torch.gather(index, 1, picked)[keep])


def bank_rows(n_patches: int, ratio: float, cap: int) -> int:
    """Memory-bank rows: `ratio` of the patches, at most `cap`; small training sets keep up to
    MIN_BANK rows (a bank that small costs nothing to search, and a few images need every patch)."""
    return min(cap, max(math.ceil(ratio * n_patches), min(n_patches, MIN_BANK)))


def fit_bank(patches: torch.Tensor, bank_size: int, seed: int = 0,
             groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch features [M, D] -> (memory bank [min(bank_size, M), D] (greedy coreset), the group of each of
    its rows when `groups` were given, else None)."""
    idx = greedy_coreset(patches, bank_size, seed=seed, groups=groups)
    return patches[idx].contiguous(), (groups[idx].clone() if groups is not None else None)


__all__ = ["MIN_BANK", "bank_rows", "fit_bank", "greedy_coreset"]
