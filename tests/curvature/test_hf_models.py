"""Models people actually train: a 2-layer GPT-2 built from a Hugging Face config (eager attention,
no weights downloaded; needs the optional ``hf`` extra) and a small ResNet with BatchNorm in eval.

Products are checked against dense float64 references on a parameter subset, and the full
Hessian against central finite differences whose error shrinks like eps^2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvature import GGN, EmpiricalFisher, Fisher, Hessian
from curvature.losses import TokenCrossEntropyLoss
from tests.app.cli_problems import import_transformers

TOL = 1e-10
DT = torch.float64


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _transformers():
    """``transformers``, or skip with the reason (the import works around a broken torchvision)."""
    try:
        return import_transformers()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"needs the optional 'hf' extra (pip install .[hf]): transformers unavailable ({exc})")


VOCAB, SEQ = 11, 6


@pytest.fixture(scope="module")
def gpt2():
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=8, vocab_size=VOCAB, n_positions=8, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(DT).eval()


def lm_data():
    """Two padded batches with different numbers of valid (shifted) labels."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (5, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    mask[4, 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batches = [
        ({"input_ids": ids[:2], "attention_mask": mask[:2]}, labels[:2]),
        ({"input_ids": ids[2:], "attention_mask": mask[2:]}, labels[2:]),
    ]
    return batches, ({"input_ids": ids, "attention_mask": mask}, labels)


def subset_function(model, names, inputs, outputs):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(th):
        parts = torch.split(th, [s.numel() for s in shapes])
        out = functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (), inputs)
        return outputs(out)

    return f, theta


def dense_refs(model, loss_fn, names, inputs, targets, outputs):
    f, theta = subset_function(model, names, inputs, outputs)
    H = torch.autograd.functional.hessian(lambda th: loss_fn(f(th), targets), theta)
    out = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta).reshape(out.numel(), -1)
    HL = torch.autograd.functional.hessian(lambda o: loss_fn(o, targets), out).reshape(out.numel(), -1)
    return H, J.T @ HL @ J


SUBSET = ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight"]


def test_gpt2_products_exact_on_a_parameter_subset(gpt2):
    loss_fn = TokenCrossEntropyLoss(shift=True)
    batches, (inputs, labels) = lm_data()
    H_ref, G_ref = dense_refs(gpt2, loss_fn, SUBSET, inputs, labels, lambda out: out.logits)
    G = GGN(gpt2, loss_fn, batches, params=SUBSET)  # the model returns CausalLMOutput...: .logits is used
    assert G.loss_info.kind == "cross_entropy"
    assert rel_err(G.to_dense(), G_ref) <= TOL
    assert rel_err(Hessian(gpt2, loss_fn, batches, params=SUBSET).to_dense(), H_ref) <= TOL
    assert rel_err(Fisher(gpt2, loss_fn, batches, params=SUBSET).to_dense(), G_ref) <= TOL
    E_split = EmpiricalFisher(gpt2, loss_fn, batches, params=SUBSET).to_dense()
    E_one = EmpiricalFisher(gpt2, loss_fn, [(inputs, labels)], params=SUBSET).to_dense()
    assert rel_err(E_split, E_one) <= TOL


def test_gpt2_outputs_callable_and_hf_style_lambda(gpt2):
    batches, (inputs, labels) = lm_data()

    def hf_loss(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)

    H_ref, G_ref = dense_refs(gpt2, hf_loss, SUBSET, inputs, labels, lambda out: out.logits)
    for Op, ref in ((GGN, G_ref), (Hessian, H_ref)):
        op = Op(gpt2, hf_loss, batches, params=SUBSET, outputs=lambda out: out["logits"])
        assert rel_err(op.to_dense(), ref) <= TOL


def test_gpt2_full_hessian_against_finite_differences(gpt2):
    loss_fn = TokenCrossEntropyLoss(shift=True)
    batches, (inputs, labels) = lm_data()
    H = Hessian(gpt2, loss_fn, batches)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT)
    v /= v.norm()
    Hv = H @ v
    names = [b.name for b in H.blocks]
    f, theta = subset_function(gpt2, names, inputs, lambda out: out.logits)

    def grad_at(th):
        th = th.clone().requires_grad_(True)
        return torch.autograd.grad(loss_fn(f(th), labels), th)[0]

    errors = [rel_err((grad_at(theta + e * v) - grad_at(theta - e * v)) / (2 * e), Hv) for e in (1e-2, 1e-3)]
    assert errors[1] <= 1e-4 and errors[1] <= errors[0] / 50  # O(eps^2) truncation


def test_gpt2_tied_lm_head_and_ggn_timing_shape(gpt2):
    loss_fn = TokenCrossEntropyLoss(shift=True)
    batches, _ = lm_data()
    G = GGN(gpt2, loss_fn, batches, params=["lm_head.weight"])  # tied to transformer.wte.weight
    assert [b.name for b in G.blocks] == ["transformer.wte.weight"]
    V = torch.randn(G.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    GV = G @ V
    assert rel_err(V.T @ GV, (V.T @ GV).T) <= 1e-12


# -- a small ResNet with BatchNorm, in eval ---------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, classes=4, c=3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = Block(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet():
    torch.manual_seed(4)
    model = TinyResNet().to(DT)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=DT) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=DT) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g, dtype=DT) + 0.5)
    return model.eval()


def test_resnet_with_batchnorm_in_eval():
    model = resnet()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 4, (7,), generator=g)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    names = ["block.conv2.weight", "block.bn2.weight", "fc.weight", "fc.bias"]
    H_ref, G_ref = dense_refs(model, nn.CrossEntropyLoss(), names, {"x": x}, y, lambda out: out)
    assert rel_err(Hessian(model, nn.CrossEntropyLoss(), batches, params=names).to_dense(), H_ref) <= TOL
    assert rel_err(GGN(model, nn.CrossEntropyLoss(), batches, params=names).to_dense(), G_ref) <= TOL
    assert rel_err(Fisher(model, nn.CrossEntropyLoss(), batches, params=names).to_dense(), G_ref) <= TOL
