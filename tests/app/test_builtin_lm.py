"""The built-in language-model problem (curvature.app.builtin_lm, ``--problem charlm``)."""

import torch

from curvature.app.builtin import BUILTIN_PROBLEMS
from curvature.app.builtin_lm import CharTransformer, char_transformer, encode_text, load_pydoc_text


def test_charlm_is_registered_and_trains():
    assert BUILTIN_PROBLEMS["charlm"] is char_transformer
    p = char_transformer(steps=60, num_batches=2, seed=0)
    assert p.info["held-out loss"] < p.info["loss at initialisation"] - 0.5
    x, y = p.data[0]
    assert x.shape == y.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert not p.model.training and p.num_classes == int(p.info["vocabulary"])


def test_transformer_is_causal():
    torch.manual_seed(0)
    m = CharTransformer(vocab_size=11, width=16, depth=2, heads=4, context=12).eval()
    a = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[:, 7:] = (b[:, 7:] + 1) % 11
    torch.testing.assert_close(m(a)[:, :7], m(b)[:, :7], rtol=0, atol=1e-6)


def test_text_is_deterministic_and_encoded_in_sorted_alphabet():
    text = load_pydoc_text()
    ids, alphabet = encode_text(text[:1000])
    assert alphabet == sorted(set(text[:1000])) and "".join(alphabet[i] for i in ids.tolist()) == text[:1000]
    assert load_pydoc_text() == text
