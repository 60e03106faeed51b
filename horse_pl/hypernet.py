"""The editor hypernetwork (MALMEN/HORSE): normaliser, low-rank residual blocks, per-layer ``lr`` and ``lambda``.

One :class:`EditorNet` serves every edit module of the same weight shape; a module is told apart by
its index into the per-layer scale/shift embeddings and the per-layer ``lr``/``lambda`` scalars.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from horse_pl.reduction import LOCAL, Reduction


class RunningMeanStd(nn.Module):
    """Running mean and variance of ``[k || g]`` rows, mergeable across processes.

    Statistics are kept as (count, mean, M2) in float64 and combined with the parallel
    mean/variance rule (Chan et al.), so merging the statistics of several shards gives exactly the
    statistics of their union.
    """

    def __init__(self, size: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @staticmethod
    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, mean, M2) of the rows of ``x``."""
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        mean = x.mean(0)
        return torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), mean, ((x - mean) ** 2).sum(0)

    @staticmethod
    def combine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Merge two (count, mean, M2) triples into the triple of the union."""
        (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
        n = n_a + n_b
        if n == 0:
            return n, mean_a, m2_a
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / n)
        m2 = m2_a + m2_b + delta**2 * (n_a * n_b / n)
        return n, mean, m2

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of rows into the statistics."""
        self.merge(*self.moments(x))

    @torch.no_grad()
    def merge(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Fold another (count, mean, M2) triple into the statistics."""
        n, new_mean, new_m2 = self.combine((self.count, self.mean, self.m2), (count, mean, m2))
        self.count.copy_(n)
        self.mean.copy_(new_mean)
        self.m2.copy_(new_m2)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count.clamp_min(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            return x
        std = self.var.sqrt().to(x.dtype)
        return (x - self.mean.to(x.dtype)) / (std + self.eps)


class LowRankBlock(nn.Module):
    """``h <- h + s[l] * relu(h A B + c) + t[l]``; ``B = 0`` at init, so the block starts as the identity.

    The ReLU is ``clamp(min=0)``, whose gradient at 0 is 1 (as in the released MALMEN/HORSE code).
    At init ``h A B + c`` is exactly 0 for every row; ``torch.relu``'s gradient there is 0, so ``B``,
    ``c`` and the scale would get no gradient and the low-rank map would never leave its initialisation.
    """

    def __init__(self, size: int, rank: int, n_modules: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Embedding(n_modules, size)
        self.shift = nn.Embedding(n_modules, size)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)
        self.product: torch.Tensor | None = None  # A @ B while HyperNetwork.fused holds it (no gradients)

    def forward(self, h: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        fused = self.product is not None and not torch.is_grad_enabled()
        x = ((h @ self.product if fused else h @ self.A @ self.B) + self.bias).clamp(min=0)
        return h + self.scale(module_idx) * x + self.shift(module_idx)


class EditorNet(nn.Module):
    """Maps normalised ``[k || g]`` rows to pseudo keys and pseudo value gradients ``(k~, g~)``.

    Args:
        key_size: ``d_in`` of the edited weights.
        value_size: ``d_out`` of the edited weights.
        rank: rank of each block's low-rank map.
        n_blocks: number of residual blocks.
        n_modules: edit modules sharing this network (one embedding row each).
        lr: initial per-module editing learning rate.
    """

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_modules: int, lr: float):
        super().__init__()
        self.key_size, self.value_size = key_size, value_size
        self.normalizer = RunningMeanStd(key_size + value_size)
        self.blocks = nn.ModuleList(LowRankBlock(key_size + value_size, rank, n_modules) for _ in range(n_blocks))
        self.lr = nn.Embedding(n_modules, 1)
        self.lamda = nn.Embedding(n_modules, 1)  # log of the ridge coefficient (``lambda`` is a Python keyword)
        nn.init.constant_(self.lr.weight, lr)
        nn.init.zeros_(self.lamda.weight)

    def forward(
        self, keys: torch.Tensor, value_grads: torch.Tensor, module_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.full(keys.shape[:-1], module_idx, dtype=torch.long, device=keys.device)
        h = self.normalizer(torch.cat((keys, value_grads), -1))
        for block in self.blocks:
            h = block(h, idx)
        return h.split([self.key_size, self.value_size], -1)


def shape_key(shape: tuple[int, int]) -> str:
    """ModuleDict key of the network serving weights of this (d_in, d_out) shape."""
    return f"{shape[0]}x{shape[1]}"


class HyperNetwork(nn.Module):
    """One :class:`EditorNet` per weight shape, addressed by edit-module position.

    Args:
        shapes: (d_in, d_out) of each edit module, in edit-module order.
        rank, n_blocks, lr: see :class:`EditorNet`.
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, n_blocks: int, lr: float):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        groups: dict[str, list[int]] = {}
        for position, shape in enumerate(self.shapes):
            groups.setdefault(shape_key(shape), []).append(position)
        self.nets = nn.ModuleDict({
            key: EditorNet(self.shapes[members[0]][0], self.shapes[members[0]][1], rank, n_blocks, len(members), lr)
            for key, members in groups.items()
        })
        # position -> (network key, index inside that network)
        self.slots = [(shape_key(s), groups[shape_key(s)].index(p)) for p, s in enumerate(self.shapes)]

    def net(self, position: int) -> tuple[EditorNet, int]:
        key, idx = self.slots[position]
        return self.nets[key], idx

    def lr(self, position: int) -> torch.Tensor:
        net, idx = self.net(position)
        return net.lr.weight[idx, 0]

    def log_lambda(self, position: int) -> torch.Tensor:
        net, idx = self.net(position)
        return net.lamda.weight[idx, 0]

    @torch.no_grad()
    def scale_lr(self, factor: float) -> None:
        """Multiply every per-layer ``lr`` by ``factor``: residuals, and with them the closed-form shifts (linear in
        the residuals; the spread is scale-equivariant), scale by ``factor``. An edit-strength probe."""
        if not factor > 0:
            raise ValueError(f"The lr scale must be positive, not {factor}.")
        for net in self.nets.values():
            net.lr.weight.mul_(factor)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the hypernetwork computes in (its parameters')."""
        return next(self.parameters()).dtype

    @torch.no_grad()
    def update_normalizer(self, keys: Sequence[torch.Tensor], value_grads: Sequence[torch.Tensor],
                          all_reduce: Reduction = LOCAL) -> None:
        """Fold a batch's ``[k || g]`` rows of every edit module into the normaliser of its shape's network
        (training only); under DDP the processes' statistics are merged first, so every process folds in the
        statistics of the whole global batch."""
        for key, net in self.nets.items():
            stats = None
            for position, (slot_key, _) in enumerate(self.slots):
                if slot_key == key:
                    moments = net.normalizer.moments(torch.cat((keys[position], value_grads[position]), -1))
                    stats = moments if stats is None else net.normalizer.combine(stats, moments)
            if all_reduce.is_distributed:
                stats = merge_moments(stats, all_reduce)
            net.normalizer.merge(*stats)

    def add_log_lambda_grad(self, position: int, grad: torch.Tensor) -> None:
        """Add ``d loss / d log lambda`` of one edit module to its network's ``lamda`` gradient (the update stage
        computes it in closed form; it is already global under DDP)."""
        net, idx = self.net(position)
        if net.lamda.weight.grad is None:
            net.lamda.weight.grad = torch.zeros_like(net.lamda.weight)
        net.lamda.weight.grad[idx, 0] += grad

    def forward(self, keys: torch.Tensor, value_grads: torch.Tensor, position: int):
        net, idx = self.net(position)
        return net(keys, value_grads, idx)

    @contextmanager
    def fused(self, rows: int) -> Iterator[None]:
        """Inside the block, passes without gradients multiply each block's rows by the product ``A B``, computed
        once on entry, instead of by ``A`` and then ``B``: ``2 s^2`` instead of ``4 s r`` FLOP a row for a block of
        size ``s`` and rank ``r``, for ``2 s^2 r`` once. A network takes it where that is less work for
        ``rows`` rows of each of its modules (the rows of one edit batch); the results differ from the unfused
        ones by float rounding only."""
        fused = []
        with torch.no_grad():
            for key, net in self.nets.items():
                n_rows = rows * sum(slot_key == key for slot_key, _ in self.slots)
                for block in net.blocks:
                    size, rank = block.A.shape
                    if n_rows * (4 * size * rank - 2 * size * size) > 2 * size * size * rank:
                        block.product = block.A @ block.B
                        fused.append(block)
        try:
            yield
        finally:
            for block in fused:
                block.product = None


def merge_moments(stats, all_reduce: Reduction):
    """Merge (count, mean, M2) across processes with sums: the parallel mean/variance rule."""
    count, mean, m2 = stats
    total = all_reduce(count.clone())
    global_mean = all_reduce(mean * count) / total
    global_m2 = all_reduce(m2 + count * (mean - global_mean) ** 2)
    return total, global_mean, global_m2
