"""Data that exists on every machine, nothing downloaded: scikit-learn's bundled digits, a byte-level
corpus of the Python standard library's own source files, and synthetic teacher–student data."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def digits(seed: int, label_noise: float = 0.0, test_fraction: float = 0.25):
    """The 1,797 8×8 digit images bundled with scikit-learn, standardised, as (N, 1, 8, 8) float32,
    split once by ``seed``. ``label_noise``: that fraction of *training* labels is replaced by a
    random class, so the loss cannot collapse to zero and gradients stay noise-dominated (the
    regime the equilibrium theory assumes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    x, y = x[order], y[order]
    n_test = int(round(test_fraction * x.shape[0]))
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:].clone(), x[:n_test], y[:n_test]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if label_noise > 0:
        flip = torch.rand(y_train.shape[0], generator=g) < label_noise
        y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return x_train, y_train, x_test, y_test


def stdlib_corpus(max_bytes: int, path: str | None = None) -> torch.Tensor:
    """Bytes (uint8) of a text file given by ``path``, else of the standard library's own .py files
    (sorted by path, so every machine with the same Python builds the same corpus)."""
    if path is not None:
        return torch.frombuffer(bytearray(Path(path).read_bytes()[:max_bytes]), dtype=torch.uint8)
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for file in sorted(root.glob("*.py")):
        data = file.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def teacher_student(n: int, dim: int, classes: int, seed: int, noise: float = 0.5):
    """Inputs x ~ N(0, I) and labels from a fixed random two-layer teacher with logit noise; the
    teacher depends on ``seed`` only, so train and test sets of any size share it."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, 4 * dim, generator=g) / dim**0.5
    w2 = torch.randn(4 * dim, classes, generator=g) / (4 * dim) ** 0.5
    gx = torch.Generator().manual_seed(seed + 1 + n)
    x = torch.randn(n, dim, generator=gx)
    logits = torch.tanh(x @ w1) @ w2 * 3.0
    y = (logits + noise * torch.randn(n, classes, generator=gx)).argmax(dim=1)
    return x, y


class Batches:
    """Shuffled mini-batches, epoch after epoch, in an order fixed by ``seed``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, min(batch, x.shape[0])
        self.g = torch.Generator().manual_seed(seed)
        self.order, self.pos, self.epochs = torch.randperm(x.shape[0], generator=self.g), 0, 0

    def next(self):
        if self.pos + self.batch > self.order.shape[0]:
            self.order, self.pos = torch.randperm(self.x.shape[0], generator=self.g), 0
            self.epochs += 1
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]


def text_batches(corpus: torch.Tensor, context: int, batch: int, seed: int):
    """One pass over ``corpus`` in random order of non-overlapping windows: yields (x, y) byte
    windows and their next-byte targets, each window seen once."""
    n = (corpus.shape[0] - 1) // context
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    data = corpus.to(torch.int64)
    for start in range(0, n - batch + 1, batch):
        idx = order[start:start + batch, None] * context + torch.arange(context)
        yield data[idx], data[idx + 1]
