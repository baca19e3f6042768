"""Built-in language-model problem of the ``curvature`` command: ``--problem charlm``.

A small character-level transformer (GPT-style: pre-LayerNorm, causal self-attention with
separate query/key/value projections, a GELU MLP) trained for a few seconds with Adam on CPython's
own reference documentation, :mod:`pydoc_data.topics` (about 465k characters of English prose and
code, shipped with every Python, so nothing is downloaded). Deterministic given the seed.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvature import TokenCrossEntropyLoss

from .problem import Problem

__all__ = ["CausalSelfAttention", "CharTransformer", "char_transformer", "load_pydoc_text", "encode_text"]

logger = logging.getLogger(__name__)


def load_pydoc_text() -> str:
    """CPython's reference documentation topics (:mod:`pydoc_data.topics`) as one string, topics
    in sorted order (about 465k characters).

    Examples:
        >>> len(load_pydoc_text()) > 100_000
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def encode_text(text: str) -> tuple[Tensor, list[str]]:
    """Characters -> token ids over the text's sorted alphabet; returns ``(ids, alphabet)``.

    Examples:
        >>> ids, alphabet = encode_text("abba")
        >>> ids.tolist(), alphabet
        ([0, 1, 1, 0], ['a', 'b'])
    """
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), alphabet


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections
    (so each is its own parameter block), written out (no fused kernel: it has a double backward)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.view(B, T, h, C // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = scores.masked_fill(mask, float("-inf")).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style character-level transformer: token and position embeddings, ``depth``
    pre-LayerNorm blocks, a final LayerNorm and an (untied) output head; logits ``(B, T, V)``.

    Examples:
        >>> m = CharTransformer(vocab_size=10, width=16, depth=1, heads=2, context=8)
        >>> m(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 10])
    """

    def __init__(self, vocab_size: int, *, width: int = 64, depth: int = 2, heads: int = 4,
                 context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.h = nn.ModuleList([_Block(width, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens is longer than the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))


def char_transformer(*, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                     steps: int = 300, num_batches: int = 4) -> Problem:
    """:class:`CharTransformer` (2 layers, width 64, 4 heads, context 64; about 110k parameters)
    trained with Adam on the first 90 % of :func:`load_pydoc_text`; the problem is its next-character
    loss on ``num_batches`` batches of 8 sequences of 64 characters from the held-out 10 %, after
    ``steps`` Adam steps (the command always trains 300 and analyses 4 batches; ``--quick`` only
    lowers its budgets). About 20 s of one CPU core.

    Held-out loss before and after training, in nats per character, are in ``info``.

    Examples:
        >>> p = char_transformer(steps=60, num_batches=2)
        >>> p.info["held-out loss"] < p.info["loss at initialisation"]
        True
    """
    device = torch.device(device)
    ids, alphabet = encode_text(load_pydoc_text())
    split = int(0.9 * len(ids))
    train, held_out = ids[:split].to(device), ids[split:].to(device)
    gen = torch.Generator().manual_seed(seed)
    context, batch_size = 64, 32
    with torch.random.fork_rng(devices=[]):  # nn.Module initialisation draws from the global RNG
        torch.manual_seed(seed)
        model = CharTransformer(len(alphabet), context=context).to(device)
    loss_fn = TokenCrossEntropyLoss()

    def windows(source: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.stack([source[s: s + context + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    eval_gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, len(held_out) - context - 1, (num_batches * 8,), generator=eval_gen)
    x_eval, y_eval = windows(held_out, starts)
    data = list(zip(x_eval.chunk(num_batches), y_eval.chunk(num_batches)))

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_fn(model(x), y)) for x, y in data) / len(data)

    initial = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(steps), desc="training the character transformer", disable=not progress, leave=False):
        x, y = windows(train, torch.randint(0, len(train) - context - 1, (batch_size,), generator=gen))
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    final = eval_loss()
    logger.info("character transformer: held-out loss %.3f nats/char (%.3f at initialisation)", final, initial)
    return Problem(model, loss_fn, data, name="character transformer (pydoc_data.topics)", metric="accuracy",
                   num_classes=len(alphabet),
                   info={"held-out loss": final, "loss at initialisation": initial,
                         "vocabulary": float(len(alphabet))})
