"""Train many copies of the fuel-cell paper's FC head together, e.g. the folds of a leave-one-bundle-out run.

K heads are stacked as [K, in, out] tensors and trained with batched matmuls, a hand-written backward pass
and a hand-written optimiser step, so the per-step framework overhead of K networks is paid once. Each
head still sees only its own training rows, in its own random order, with its own flips, class weights
and optimiser state: training a head in a group of K gives the same result, up to float rounding, as
training it alone (K = 1 is ``FCHead.fit``).

The cost: ~5.9 MFLOP per sample per epoch for D = 512, so the paper's grid (4 methods x 12 folds x 50 epochs
x ~655 samples, 50,400 steps of batch 32) is ~9.5 TFLOP. A step also streams each head's weights and momentum
(~9 MB, beyond a core's L2), so each layer is updated as soon as backpropagation is past it, while its
weights and gradient are still in cache, and heads train a few at a time (3 at D = 512: per-operation
overhead shared, working set small). On this project's 2-core CPU: ~2.5 ms per head and step in fp32 (~75
GFLOP/s), ~1.9 ms with ``precision="bf16"``; the grid in ~64 s / ~50 s with a configuration per core.

The network is the paper's: Linear(D, 1000) (the backbone's ImageNet fc) -> ReLU -> 512 -> ReLU -> 256 ->
ReLU -> 2, cross-entropy, step-decayed learning rate. ``init_head`` builds the same network as a
``torch.nn.Sequential`` with the same initial weights, for end-to-end comparisons.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xfeat.learn.binary import by_row_blocks

HIDDEN = (1000, 512, 256)
N_CLASSES = 2
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
PRECISIONS = {"fp32": "highest", "bf16": "medium"}  # torch.set_float32_matmul_precision's names
GROUP_BYTES = 15e6  # float32 weights of heads trained together: 3 heads at D = 512, 2 at 768, 1 from 1280 on


@dataclass(frozen=True)
class HeadConfig:
    """How to train: the paper's schedule by default (lr 0.001, x0.1 every 10 epochs, 50 epochs).

    ``optimizer`` is ``"sgd"`` (with ``momentum``, as in PyTorch's transfer-learning recipe, whose schedule
    the paper's resembles) or ``"adam"`` (PyTorch's defaults: betas 0.9, 0.999, eps 1e-8). ``class_weight`` is
    None, ``"balanced"`` (n / (2 n_c) on each head's own rows) or a pair (weight of class 0, of class 1).
    """

    epochs: int = 50
    lr: float = 1e-3
    lr_step: int = 10
    lr_gamma: float = 0.1
    batch_size: int = 32
    optimizer: str = "sgd"
    momentum: float = 0.9
    class_weight: None | str | tuple[float, float] = None
    flips: bool = True
    precision: str = "fp32"

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.lr_gamma ** (epoch // self.lr_step)


@dataclass
class TrainedHead:
    """A trained head as plain arrays: weights [in, out] and biases [out] per layer, and how it trained."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    loss_curve: list[float]  # mean mini-batch loss per epoch
    variant_counts: np.ndarray  # how often each flip variant was drawn, over all epochs


def head_module(n_features: int) -> nn.Sequential:
    """The paper's head as a torch module (default PyTorch initialisation)."""
    sizes = (n_features, *HIDDEN, N_CLASSES)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def init_head(n_features: int, seed: int, fc_weight: np.ndarray | None = None,
              fc_bias: np.ndarray | None = None) -> nn.Sequential:
    """The head as ``torch.manual_seed(seed)`` then ``head_module`` would build it, with the pretrained fc copied in.

    The first layer is always drawn (then overwritten) so the random layers are the same with or without
    a pretrained fc; the global torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = head_module(n_features)
    with torch.no_grad():
        if fc_weight is not None:
            net[0].weight.copy_(torch.as_tensor(np.asarray(fc_weight, np.float32)))
        if fc_bias is not None:
            net[0].bias.copy_(torch.as_tensor(np.asarray(fc_bias, np.float32)))
    return net


def epoch_plan(rng: np.random.Generator, n: int, n_variants: int, flips: bool) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of one head: the j-th sample seen is ``order[j]``, in flip variant ``variant[j]``.

    Variants are stored in the order none, h, v, hv, so a horizontal flip (p = 0.5) and an independent
    vertical flip (p = 0.5) select variant h + 2 v. With two variants (none, h) only h is drawn.
    """
    order = rng.permutation(n)
    variant = np.zeros(n, np.int64)
    if flips and n_variants > 1:
        variant += rng.random(n) < 0.5
        if n_variants >= 4:
            variant += 2 * (rng.random(n) < 0.5)
    return order, variant


def as_variants(X: np.ndarray) -> np.ndarray:
    """Features as float32 [N, F, D]: [N, D] input is one variant (no flips)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 2:
        X = X[:, None, :]
    if X.ndim != 3 or X.shape[1] not in (1, 2, 4):
        raise ValueError(f"features must be [N, D] or [N, F, D] with F in 1, 2, 4 flip variants; got {X.shape}")
    return X


def class_weights(y: np.ndarray, class_weight: None | str | tuple[float, float]) -> np.ndarray:
    """Loss weight of class 0 and class 1 for one head's training labels."""
    if class_weight is None:
        return np.ones(N_CLASSES)
    if isinstance(class_weight, str) and class_weight != "balanced":
        raise ValueError(f"unknown class_weight {class_weight!r}; None, 'balanced' or (weight 0, weight 1)")
    if class_weight == "balanced":
        counts = np.bincount(y, minlength=N_CLASSES)
        return len(y) / (N_CLASSES * np.maximum(counts, 1))
    return np.asarray(class_weight, dtype=np.float64)


def forward(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
    """The logits [N, 2] of one trained head for features [N, D], in float64.

    Float64 alone does not make a row's logits independent of N (a matrix product's rounding depends on its
    number of rows): the rows go through products of one fixed shape (``by_row_blocks``), so a row gets the
    same bits alone or among others.
    """
    weights = [np.asarray(w, dtype=np.float64) for w in weights]

    def logits(rows: np.ndarray) -> np.ndarray:
        h = np.asarray(rows, dtype=np.float64)
        for i, (w, b) in enumerate(zip(weights, biases)):
            h = h @ w + b
            if i < len(weights) - 1:
                h = np.maximum(h, 0)
        return h

    return by_row_blocks(logits, np.asarray(X))


def train_heads(X: np.ndarray, y: np.ndarray, train_masks: np.ndarray, config: HeadConfig,
                seeds: int | Sequence[int] = 0, fc_weight: np.ndarray | None = None,
                fc_bias: np.ndarray | None = None, group_size: int | None = None) -> list[TrainedHead]:
    """Train one head per row of ``train_masks`` ([K, N] booleans) on features X [N, D] or [N, F, D].

    ``y`` holds 0 / 1 (1 = abnormal). Head k trains on the rows where ``train_masks[k]`` is true, drawing
    its initial weights, data order and flips from ``seeds[k]`` (one int: the same seed for every head, so
    head k equals a head trained alone on its rows with that seed).

    Heads train ``group_size`` at a time (results do not depend on it beyond float rounding); by default as many
    as keep a group's float32 weights within ``GROUP_BYTES``. Measured on one thread, ms per head and step:
    D = 512 (fp32 / bf16): 1 head 2.6 / 2.5, 3 heads 2.4 / 1.9, 12 heads 2.9 / 1.9; D = 1280 (fp32): 1 head 5.2,
    2 heads 6.5, 3 heads 6.2. Grouping shares the per-operation overhead; large groups fall out of cache.
    """
    X3 = torch.from_numpy(as_variants(X))
    y = np.asarray(y, dtype=np.int64)
    masks = np.atleast_2d(np.asarray(train_masks, dtype=bool))
    seeds = [int(seeds)] * len(masks) if np.isscalar(seeds) else [int(s) for s in seeds]
    if masks.shape[1] != len(X3) or len(y) != len(X3) or len(seeds) != len(masks):
        raise ValueError(f"{len(X3)} samples, {len(y)} labels, train masks {masks.shape}, {len(seeds)} seeds")
    if group_size is None:
        n_params = sum(n_in * n_out + n_out for n_in, n_out in zip((X3.shape[2], *HIDDEN), (*HIDDEN, N_CLASSES)))
        group_size = max(1, int(GROUP_BYTES // (4 * n_params)))
    heads: list[TrainedHead] = []
    with matmul_precision(config.precision):
        for start in range(0, len(masks), group_size):
            group = slice(start, start + group_size)
            heads += _train_group(X3, y, masks[group], config, seeds[group], fc_weight, fc_bias)
    return heads


def _train_group(X3: torch.Tensor, y: np.ndarray, masks: np.ndarray, config: HeadConfig, seeds: list[int],
                 fc_weight, fc_bias) -> list[TrainedHead]:
    """Train these heads together: stacked parameters, batched matmuls, one optimiser step for all."""
    n_heads, n_variants, n_features = len(masks), X3.shape[1], X3.shape[2]
    rows = [np.flatnonzero(m) for m in masks]
    n_batches = np.array([math.ceil(len(r) / config.batch_size) for r in rows])
    # Heads sorted by batches per epoch, most first: at any step the heads still training are a prefix,
    # so padded steps are skipped by slicing, and a head's parameters and optimiser state stay untouched.
    sort = np.argsort(-n_batches, kind="stable")
    rows = [rows[k] for k in sort]
    n_batches = n_batches[sort]
    rngs = [np.random.default_rng(seeds[k]) for k in sort]
    params = _stack_params([init_head(n_features, seeds[k], fc_weight, fc_bias) for k in sort])
    tensors = _Tensors.allocate(params, config)
    weights = torch.tensor(np.stack([class_weights(y[r], config.class_weight) for r in rows]), dtype=torch.float32)
    targets = torch.from_numpy(y)
    losses = np.zeros((n_heads, config.epochs))
    counts = np.zeros((n_heads, n_variants), np.int64)
    B = config.batch_size
    for epoch in range(config.epochs):
        index, variant, valid = _epoch_batches(rngs, rows, n_variants, config.flips, int(n_batches[0]) * B)
        for k, v in enumerate(variant):
            counts[k] += np.bincount(v[: len(rows[k])], minlength=n_variants)
        index, variant, valid = map(torch.from_numpy, (index, variant, valid))
        # the whole epoch's inputs, labels and loss weights at once: per step only views are taken
        x_epoch, y_epoch = X3[index, variant], targets[index]
        w_epoch = weights.gather(1, y_epoch) * valid
        epoch_loss = torch.zeros(n_heads)
        for step in range(int(n_batches[0])):
            k = int(np.sum(n_batches > step))
            cols = slice(step * B, (step + 1) * B)
            active = tensors if k == n_heads else tensors.prefix(k)
            loss = _step(active, x_epoch[:k, cols], y_epoch[:k, cols], w_epoch[:k, cols], config,
                         config.lr_at(epoch))
            epoch_loss[:k] += loss
        losses[:, epoch] = epoch_loss.numpy() / n_batches
    return _unstack(params, losses, counts, np.argsort(sort))


def _stack_params(nets: list[nn.Sequential]) -> list[torch.Tensor]:
    """[W1, b1, W2, b2, ...]: weights [K, in, out], biases [K, 1, out] (broadcast over a mini-batch)."""
    linears = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
    params = []
    for layer in range(len(linears[0])):
        params.append(torch.stack([lin[layer].weight.detach().T for lin in linears]).contiguous())
        params.append(torch.stack([lin[layer].bias.detach()[None] for lin in linears]).contiguous())
    return params


@dataclass
class _Tensors:
    """Everything K heads update while training, allocated once: a fresh multi-megabyte tensor every step
    costs page faults worth a third of the step's arithmetic.

    For SGD, ``state`` is [momentum] per parameter and gradients go straight into it (``grads`` is empty);
    for Adam it is [first moment, second moment, step count].
    """

    params: list[torch.Tensor]
    state: list[list[torch.Tensor]]
    grads: list[torch.Tensor]

    @classmethod
    def allocate(cls, params: list[torch.Tensor], config: HeadConfig) -> _Tensors:
        if config.optimizer == "sgd":
            state, grads = [[torch.zeros_like(p)] for p in params], []
        elif config.optimizer == "adam":
            state = [[torch.zeros_like(p), torch.zeros_like(p), torch.zeros(len(p), 1, 1, dtype=torch.float64)]
                     for p in params]
            grads = [torch.zeros_like(p) for p in params]
        else:
            raise ValueError(f"unknown optimizer {config.optimizer!r}; one of sgd, adam")
        return cls(params, state, grads)

    def prefix(self, k: int) -> _Tensors:
        """The first k heads (views: updating them updates these tensors)."""
        return _Tensors([p[:k] for p in self.params], [[s[:k] for s in group] for group in self.state],
                        [g[:k] for g in self.grads])


def _epoch_batches(rngs, rows, n_variants, flips, width):
    """Each head's epoch as padded [K, width] arrays: row index, flip variant, and 1 / 0 for real / padding."""
    index = np.zeros((len(rows), width), np.int64)
    variant = np.zeros((len(rows), width), np.int64)
    valid = np.zeros((len(rows), width), np.float32)
    for k, (rng, r) in enumerate(zip(rngs, rows)):
        order, v = epoch_plan(rng, len(r), n_variants, flips)
        index[k, : len(r)], variant[k, : len(r)], valid[k, : len(r)] = r[order], v, 1
    return index, variant, valid


def _step(t: _Tensors, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, config: HeadConfig,
          lr: float) -> torch.Tensor:
    """One training step of K heads on their mini-batches, in place, with the semantics of torch.optim.SGD /
    torch.optim.Adam; returns each head's loss.

    For SGD the backward pass adds each gradient straight into its momentum buffer (the GEMM's
    ``beta * C + A @ B``), saving two passes over the 1.2 M parameters of each head per step, and each layer is
    updated right after its gradient: on a CPU the step is as much memory traffic as arithmetic.
    """
    if config.optimizer == "sgd":
        momentum = [s[0] for s in t.state]

        def sgd_update(i: int) -> None:
            t.params[i].add_(momentum[i], alpha=-lr)

        return _backward(t, x, target, weight, momentum, config.momentum, sgd_update)

    def adam_update(i: int) -> None:
        p, g, (m, v, count) = t.params[i], t.grads[i], t.state[i]
        count += 1
        m.lerp_(g, 1 - ADAM_BETAS[0])
        v.mul_(ADAM_BETAS[1]).addcmul_(g, g, value=1 - ADAM_BETAS[1])
        step = (lr / (1 - ADAM_BETAS[0] ** count)).float()  # bias corrections in float64, as torch does
        denom = (v.sqrt() / (1 - ADAM_BETAS[1] ** count).sqrt().float()).add_(ADAM_EPS)
        p.sub_((m / denom).mul_(step))

    return _backward(t, x, target, weight, t.grads, 0.0, adam_update)


def _backward(t: _Tensors, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
              into: list[torch.Tensor], beta: float, update: Callable[[int], None]) -> torch.Tensor:
    """Class-weighted mean cross-entropy of each head on its mini-batch, with its gradients written to ``into``
    as ``into = beta * into + gradient``, and ``update(i)`` called for parameter i as soon as backpropagation
    no longer needs it: its weights and gradient are then still in cache. Backward pass by hand."""
    n_layers = len(t.params) // 2
    acts = [x]
    for layer in range(n_layers):
        z = torch.baddbmm(t.params[2 * layer + 1], acts[-1], t.params[2 * layer])
        acts.append(z.relu_() if layer < n_layers - 1 else z)
    logp = acts[-1].log_softmax(-1)
    weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-12)  # the weighted mean of PyTorch's loss
    loss = -(weight * logp.gather(-1, target[..., None])[..., 0]).sum(1)
    delta = logp.exp()
    delta.scatter_add_(-1, target[..., None], -torch.ones_like(delta[..., :1]))
    delta *= weight[..., None]
    for layer in reversed(range(n_layers)):
        w, grad_w, grad_b = t.params[2 * layer], into[2 * layer], into[2 * layer + 1]
        torch.add(delta.sum(1, keepdim=True), grad_b, alpha=beta, out=grad_b)
        grad_w.baddbmm_(acts[layer].transpose(1, 2), delta, beta=beta)
        if layer:  # the error of the layer below, through the weights before their update
            below = torch.bmm(delta, w.transpose(1, 2))
            # ReLU's backward, as autograd runs it: zero where the activation was (one pass, no mask tensor)
            delta = torch.ops.aten.threshold_backward(below, acts[layer], 0.0)
        update(2 * layer)
        update(2 * layer + 1)
    return loss


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run float32 matmuls in ``precision``: "bf16" lets oneDNN (CPU) or cuBLAS round their inputs to bf16 and
    accumulate in float32, as autocast would, while weights, optimiser state and everything else stay float32.

    It is a process-wide torch setting, restored on exit; CPUs without bf16 support keep computing in float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(PRECISIONS[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _unstack(params, losses, counts, unsort) -> list[TrainedHead]:
    heads = []
    for k in unsort:
        heads.append(TrainedHead(
            weights=[p[k].numpy().copy() for p in params[0::2]],
            biases=[p[k, 0].numpy().copy() for p in params[1::2]],
            loss_curve=losses[k].tolist(), variant_counts=counts[k]))
    return heads


__all__ = ["HeadConfig", "TrainedHead", "train_heads", "init_head", "head_module", "epoch_plan", "forward",
           "as_variants", "class_weights", "matmul_precision"]
