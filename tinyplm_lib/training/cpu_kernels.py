"""Faster CPU versions of three pieces of a training step, each the same function as the one it replaces.

Profiled on the development CPU (13M model, 32 × 128, bf16 autocast), a step spent more time in
attention dropout, in the attention's unfused SDPA fallback and in the 32k-way log-softmax than in
its matrix products. Here:

- `ChunkedCrossEntropy`: the summed loss and its gradient, sixteen rows at a time, in cache.
- `"tinyplm_cpu"` attention (registered with transformers' `AttentionInterface`, chosen by
  `RuntimeOptions.attention = "auto"` on a CPU): HF's eager attention with the query scaled before the
  product (4× fewer elements than the scores) and dropout as one uniform draw and a masked fill.
- `FastDropout`: the model's `nn.Dropout` modules, the same way (swapped in by `use_fast_dropout`).

torch's `dropout` draws a Bernoulli per element (~4 ns each here); `torch.rand` then a comparison costs
about half. Both keep each element with probability 1 − p and scale it by 1 / (1 − p), from the
global (seeded, checkpointed) generator. GPUs keep torch's fused kernels: none of this is used there.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

CPU_ATTENTION = "tinyplm_cpu"


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy computed a few rows at a time.

    torch's fp32 log-softmax over all masked rows (~600 × 32,768 a step of 32 × 128) and its backward
    stream ~10 tensors of 80 MB through memory: ~105 ms a step here. Sixteen rows (2 MB in fp32) stay
    in cache from the cast to the gradient: ~25 ms, the same loss and gradient to fp32 rounding
    (tests/test_training.py). The gradient is `softmax − one-hot`, in the logits' dtype.
    """

    ROWS = 16

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, len(logits), ChunkedCrossEntropy.ROWS):
            rows = logits[start:start + ChunkedCrossEntropy.ROWS].float()
            picked = rows.gather(1, targets[start:start + ChunkedCrossEntropy.ROWS, None]).squeeze(1)
            total += (torch.logsumexp(rows, dim=-1) - picked).sum()
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, len(logits), ChunkedCrossEntropy.ROWS):
            chunk = torch.softmax(logits[start:start + ChunkedCrossEntropy.ROWS].float(), dim=-1)
            chunk[torch.arange(len(chunk)), targets[start:start + ChunkedCrossEntropy.ROWS]] -= 1.0
            grad[start:start + ChunkedCrossEntropy.ROWS] = chunk.mul_(grad_total)
        return grad, None


def dropped(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask, True (drop) with probability `p`, from the global generator."""
    return torch.rand(shape, device=device) < p


class FastDropout(torch.nn.Dropout):
    """`nn.Dropout` with a uniform draw for a mask: same p, same scaling, same train/eval behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x.masked_fill(dropped(x.shape, self.p, x.device), 0.0) * (1.0 / (1.0 - self.p))


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap every `nn.Dropout` in `model` for a `FastDropout` of the same p (no weights change); the count."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(module, name, FastDropout(child.p))
                swapped += 1
    return swapped


def cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF's eager attention (modeling_bert.eager_attention_forward), rearranged for a CPU."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    if module.training and dropout > 0.0:
        # The 1 / (1 - p) scale on the output (4× smaller than the weights), after the product.
        weights = weights.masked_fill(dropped(weights.shape, dropout, weights.device), 0.0)
        output = torch.matmul(weights, value) * (1.0 / (1.0 - dropout))
    else:
        output = torch.matmul(weights, value)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(CPU_ATTENTION, cpu_attention)
AttentionMaskInterface.register(CPU_ATTENTION, eager_mask)  # the additive float mask eager attention takes
