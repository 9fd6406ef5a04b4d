"""What is benchmarked: the optimizers and their hyperparameters, the model-sized shape sets, and
the bytes-per-parameter model that turns a step time into bandwidth (docs/performance.md)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

OPTIMIZERS = ("adamw", "sgd", "lion")
PUBLIC_SHAPE_SETS = ("gpt2", "resnet50", "many-small")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Hyperparameters shared by every competitor of an optimizer. Weight decay is on everywhere so the
# decay path is timed; SGD has momentum, as in practice (and as the 20 B/param figure assumes).
HYPER = {
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "sgd": dict(lr=1e-3, momentum=0.9, weight_decay=1e-2),
    "lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2),
}



# ----------------------------------------------------------------------------- shape sets

def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124.4M parameters, 148 tensors) as Hugging Face stores it (Conv1D is in×out)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),                   # ln_1 weight, bias
            (d, 3 * d), (3 * d,),         # attn.c_attn
            (d, d), (d,),                 # attn.c_proj
            (d,), (d,),                   # ln_2
            (d, 4 * d), (4 * d,),         # mlp.c_fc
            (4 * d, d), (d,),             # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's parameters (25.56M, 161 tensors) from its layer list, as torchvision builds it:
    conv weights K×C×kh×kw without bias, BatchNorm weight and bias, fc 1000×2048 plus bias."""
    def conv_bn(k, c, kernel):
        return [(k, c, kernel, kernel), (k,), (k,)]

    shapes = conv_bn(64, 3, 7)  # stem
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        out_ch = 4 * width  # bottleneck expansion
        for block in range(blocks):
            shapes += conv_bn(width, in_ch, 1) + conv_bn(width, width, 3) + conv_bn(out_ch, width, 1)
            if block == 0:
                shapes += conv_bn(out_ch, in_ch, 1)  # downsample projection
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def many_small_shapes() -> list[tuple[int, ...]]:
    """10,000 tensors of 256 elements: per-tensor overhead dominates (the bytes take ~2 ms on CPU)."""
    return [(256,)] * 10_000


def tiny_shapes() -> list[tuple[int, ...]]:
    """A few small tensors for the smoke test (--shapes tiny, not listed in --help)."""
    return [(7,), (33, 17), (256,), (4, 3, 3, 3)]


SHAPE_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "many-small": many_small_shapes,
    "tiny": tiny_shapes,
}


def numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def make_tensors(shapes, dtype, device, seed=0):
    """Parameters (leaf tensors) with their gradients attached, identical for every competitor."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (0.02 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
        p.grad = (1e-3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
        params.append(p)
    return params


# ----------------------------------------------------------------------------- bytes model

def bytes_per_param(optimizer: str, param_dtype: torch.dtype, state_dtype: torch.dtype | None = None,
                    *, amsgrad: bool = False, momentum: bool = True) -> int:
    """Bytes one step must move per parameter if each input is read once and each output written once:
    the parameter is read and written, the gradient (parameter dtype) read, each state tensor read and
    written. AdamW fp32: 3·4 + 2·4·2 = 28 (amsgrad 36); SGD with momentum and Lion fp32: 20."""
    p = torch.empty(0, dtype=param_dtype).element_size()
    s = torch.empty(0, dtype=state_dtype or param_dtype).element_size()
    states = {"adamw": 2 + int(amsgrad), "sgd": int(momentum), "lion": 1}[optimizer]
    return 3 * p + 2 * s * states
