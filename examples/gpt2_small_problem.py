"""GPT-2 small (124M parameters) as a ``curvature report`` problem, built from a config (random
initialisation, nothing downloaded).

    python -m curvature report --problem examples/gpt2_small_problem.py:build --quick

12 layers, width 768, 12 heads, vocabulary 50,257, sequences of 256 tokens: the bytes of CPython's
reference documentation (:mod:`pydoc_data.topics`) as token ids (GPT-2's first 256 tokens are its
byte tokens; without the tokenizer's merges this is not GPT-2's tokenization, but the shapes, the
vocabulary and the loss are). Eager attention (the fused SDPA kernels have no double backward),
dropout off (eval mode). ``tiny=True`` builds a 2-layer, width-64 model of the same vocabulary
for dry runs.
"""

from __future__ import annotations

import torch

from curvature import TokenCrossEntropyLoss
from curvature.app import Problem


def gpt2_config(*, tiny: bool = False):
    """The ``transformers.GPT2Config`` of GPT-2 small (or a tiny one of the same vocabulary)."""
    from transformers import GPT2Config

    size = dict(n_layer=2, n_embd=64, n_head=2) if tiny else {}
    return GPT2Config(n_positions=1024, vocab_size=50257, attn_implementation="eager", **size)


def pydoc_tokens(num_sequences: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """``(num_sequences, seq_len)`` byte ids of random windows of :mod:`pydoc_data.topics`."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (num_sequences,), generator=gen).tolist()
    return torch.stack([data[s: s + seq_len] for s in starts])


def build(*, seed: int = 0, device: str | torch.device = "cpu", tiny: bool = False,
          batch_size: int = 2, seq_len: int = 256) -> Problem:
    """GPT-2 small and one batch of ``batch_size`` sequences of ``seq_len`` tokens (``--quick``
    lowers the command's budgets on this same batch)."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):  # HF initialisation draws from the global RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(tiny=tiny)).to(device).eval()
    tokens = pydoc_tokens(batch_size, seq_len, seed=seed).to(device)
    name = "GPT-2 small (random init)" if not tiny else "tiny GPT-2 (2 layers, width 64)"
    return Problem(model, TokenCrossEntropyLoss(shift=True), (tokens, tokens), name=name)


def build_tiny(*, seed: int = 0, device: str | torch.device = "cpu") -> Problem:
    """A 2-layer, width-64 GPT-2 of the full vocabulary on sequences of 32 tokens (dry runs)."""
    return build(seed=seed, device=device, tiny=True, seq_len=32)
