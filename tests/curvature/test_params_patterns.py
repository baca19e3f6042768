"""Parameter selection by name and glob pattern (curvature.params), inherited by every params=."""

import pytest
import torch
from torch import nn

from curvature import GGN, Hessian, match_names, select_parameters
from quant import sensitivity
from quant.layers import quantizable_layers


class TinyBlock(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)

    def forward(self, x):
        return self.ln(x + self.mlp(torch.tanh(self.attn(x))))


class TinyStack(nn.Module):
    def __init__(self, width=4, depth=2, classes=3):
        super().__init__()
        self.h = nn.ModuleList([TinyBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return self.head(x)


def _model():
    torch.manual_seed(0)
    return TinyStack().double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def test_pattern_selects_in_model_order():
    names, tensors = select_parameters(_model(), "h.*.attn.*")
    assert names == ["h.0.attn.weight", "h.0.attn.bias", "h.1.attn.weight", "h.1.attn.bias"]
    assert len(tensors) == 4


def test_list_of_patterns_and_names_mix_without_duplicates():
    names, _ = select_parameters(_model(), ["head.weight", "h.1.*", "*.ln.bias"])
    assert names == ["h.0.ln.bias", "h.1.attn.weight", "h.1.attn.bias", "h.1.mlp.weight", "h.1.mlp.bias",
                     "h.1.ln.weight", "h.1.ln.bias", "head.weight"]


def test_pattern_equals_predicate_selection():
    m = _model()
    by_pattern = select_parameters(m, "*.mlp.weight")[0]
    by_predicate = select_parameters(m, lambda n, p: n.endswith("mlp.weight"))[0]
    assert by_pattern == by_predicate == ["h.0.mlp.weight", "h.1.mlp.weight"]


def test_pattern_matching_nothing_names_closest():
    with pytest.raises(ValueError, match=r"pattern 'h\.\*\.atn\.\*' matches nothing; closest .*attn"):
        select_parameters(_model(), "h.*.atn.*")
    with pytest.raises(ValueError, match="unknown parameter names.*closest"):
        select_parameters(_model(), ["h.0.attn.wieght"])


def test_pattern_skips_frozen_but_names_do_not():
    m = _model()
    m.h[0].attn.weight.requires_grad_(False)
    assert select_parameters(m, "h.0.attn.*")[0] == ["h.0.attn.bias"]
    with pytest.raises(ValueError, match="does not require grad"):
        select_parameters(m, ["h.0.attn.weight"])
    with pytest.raises(ValueError, match="only parameters that do not require grad"):
        select_parameters(m, "h.0.attn.w*")


def test_tied_parameter_by_pattern_listed_once():
    m = nn.ModuleDict({"embed": nn.Embedding(5, 3), "head": nn.Linear(3, 5, bias=False)})
    m.head.weight = m.embed.weight
    assert select_parameters(m, "head.*")[0] == ["embed.weight"]
    assert select_parameters(m, "*.weight")[0] == ["embed.weight"]


@pytest.mark.parametrize("Op", [Hessian, GGN])
def test_operator_with_pattern_equals_operator_with_names(Op):
    m, data = _model(), _data()
    loss = nn.CrossEntropyLoss()
    A = Op(m, loss, data, params="h.*.attn.*")
    B = Op(m, loss, data, params=["h.0.attn.weight", "h.0.attn.bias", "h.1.attn.weight", "h.1.attn.bias"])
    assert [b.name for b in A.blocks] == [b.name for b in B.blocks]
    v = torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(A @ v, B @ v, rtol=0, atol=0)


def test_match_names_keeps_order_and_rejects_non_strings():
    assert match_names(["b", "a", "ab"], ["a*"]) == ["a", "ab"]
    with pytest.raises(TypeError):
        match_names(["a"], ["a", 3])


def test_quant_layers_accept_patterns():
    m = _model()
    assert list(quantizable_layers(m, "h.*.mlp")) == ["h.0.mlp", "h.1.mlp"]
    assert list(quantizable_layers(m, ["head", "h.1.*"])) == ["h.1.attn", "h.1.mlp", "head"]
    with pytest.raises(ValueError, match="layer pattern 'h.*.mpl' matches nothing; closest"):
        quantizable_layers(m, "h.*.mpl")
    s = sensitivity(m, nn.CrossEntropyLoss(), _data(), layers="h.*.attn", num_matvecs=2,
                    generator=torch.Generator().manual_seed(0))
    assert list(s) == ["h.0.attn", "h.1.attn"]
