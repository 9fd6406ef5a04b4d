"""Models small enough for two CPU cores."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvNet(nn.Module):
    """A CNN for 8×8 digits: three 3×3 conv layers, each followed by BatchNorm (so each conv filter
    is scale-invariant: the loss does not change when it is multiplied by a positive constant),
    global average pooling and a linear classifier (not scale-invariant)."""

    def __init__(self, width: int = 16, classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    #: Weights followed by a normalization layer.
    scale_invariant = ("conv1.weight", "conv2.weight", "conv3.weight")

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    """Two hidden layers, each Linear followed by LayerNorm, then a linear head. LayerNorm
    normalises across a layer's outputs, so each hidden weight *matrix* is scale-invariant as a
    whole (not each row, as BatchNorm makes each conv filter)."""

    def __init__(self, inputs: int, hidden: int, classes: int):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(inputs, hidden, bias=False), nn.LayerNorm(hidden)
        self.fc2, self.ln2 = nn.Linear(hidden, hidden, bias=False), nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    scale_invariant = ("fc1.weight", "fc2.weight")

    def forward(self, x):
        x = torch.relu(self.ln1(self.fc1(x)))
        x = torch.relu(self.ln2(self.fc2(x)))
        return self.head(x)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A pre-LayerNorm GPT over bytes (vocabulary 256)."""

    def __init__(self, context: int = 64, d: int = 64, layers: int = 2, heads: int = 4, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("out.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))
            elif p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

