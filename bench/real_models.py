"""Curvature products on models people train: a 2-layer GPT-2 (Hugging Face config, eager
attention, random weights) and a small ResNet with BatchNorm in eval.

Compared, interleaved round-robin in one process (medians; this machine is shared and drifts):

* ``H @ V`` (k=8 columns) of :class:`curvature.Hessian` against a hand-written ``torch.func``
  double backward on the same model, loss and batch (``vmap(vjp(grad(loss)))``, which also pays
  its forward and first backward every call), and against a hand-written autograd loop of 8
  second backwards through one create-graph gradient;
* ``G @ V`` (k=8) of :class:`curvature.GGN` against the Hessian's product.

Operators are built with ``cache_graph=False`` so every product pays its own forward, like the
baselines. Run: ``python bench/real_models.py --repeats 7 --json bench/results/real_models.json``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvature import GGN, Hessian
from curvature.losses import TokenCrossEntropyLoss

try:
    from bench.timing import environment, print_table, write_json
except ImportError:  # run as a script from bench/
    from timing import environment, print_table, write_json  # type: ignore[no-redef]


def _gpt2(seed: int = 0) -> tuple[nn.Module, Any, Any, Callable[..., torch.Tensor], Callable[[Any], Any]]:
    try:
        importlib.import_module("torchvision")
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a torchvision wheel built for another torch breaks transformers
        sys.modules["torchvision"] = None
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=32,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 256, (8, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 24:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask}, labels, TokenCrossEntropyLoss(shift=True), (
        lambda out: out.logits
    )


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class _ResNet(nn.Module):
    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(_Block(c), _Block(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _resnet(seed: int = 0) -> tuple[nn.Module, Any, Any, Callable[..., torch.Tensor], Callable[[Any], Any]]:
    torch.manual_seed(seed)
    model = _ResNet().eval()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    return model, x, y, nn.CrossEntropyLoss(), (lambda out: out)


def _call(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return functional_call(model, params, (), inputs)
    return functional_call(model, params, (inputs,))


def _baselines(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable, pick: Callable):
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for _, p in model.named_parameters())

    def loss_of(*ps: torch.Tensor) -> torch.Tensor:
        return loss_fn(pick(_call(model, dict(zip(names, ps)), inputs)), targets)

    def func_double_backward(V: list[torch.Tensor]) -> Any:
        _, vjp_fn = torch.func.vjp(torch.func.grad(loss_of, argnums=tuple(range(len(primals)))), *primals)
        return torch.func.vmap(vjp_fn)(tuple(V))

    params = list(model.parameters())

    def autograd_loop(V: list[torch.Tensor]) -> Any:
        loss = loss_fn(pick(_call(model, dict(model.named_parameters()), inputs)), targets)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return [torch.autograd.grad(g, params, [v[i] for v in V], retain_graph=True) for i in range(V[0].shape[0])]

    return func_double_backward, autograd_loop


def _round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (also the auto backends' one-time measurement)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def _bench_one(label: str, model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable, pick: Callable,
               repeats: int, k: int) -> dict[str, Any]:
    H = Hessian(model, loss_fn, (inputs, targets), cache_graph=False, outputs=pick)
    G = GGN(model, loss_fn, (inputs, targets), cache_graph=False, outputs=pick)
    V = torch.randn(H.shape[0], k, generator=torch.Generator().manual_seed(0))
    V_list = [t.clone() for t in H.unflatten_columns(V)] if hasattr(H, "unflatten_columns") else [
        V.T[:, b.slice].reshape(k, *b.shape).contiguous() for b in H.blocks
    ]
    func_db, loop_db = _baselines(model, inputs, targets, loss_fn, pick)
    medians = _round_robin({
        "hessian": lambda: H @ V,
        "func_double_backward": lambda: func_db(V_list),
        "autograd_loop": lambda: loop_db(V_list),
        "ggn": lambda: G @ V,
    }, repeats)
    return {
        "model": label, "d": H.shape[0], "k": k, **{f"{n}_s": t for n, t in medians.items()},
        "hessian/func_db": medians["hessian"] / medians["func_double_backward"],
        "hessian/autograd_loop": medians["hessian"] / medians["autograd_loop"],
        "ggn/hessian": medians["ggn"] / medians["hessian"],
        "hessian_backend": H.backend_choice(k).backend, "ggn_backend": G.backend_choice(k).backend,
    }


def run(repeats: int, k: int = 8) -> list[dict[str, Any]]:
    rows = []
    for label, build in (("gpt2-2layer", _gpt2), ("resnet-bn-eval", _resnet)):
        try:
            model, inputs, targets, loss_fn, pick = build()
        except Exception as exc:  # noqa: BLE001 - transformers missing
            print(f"skipping {label}: {exc}")
            continue
        rows.append(_bench_one(label, model, inputs, targets, loss_fn, pick, repeats, k))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per function (default 7)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    print_table(rows, ["model", "d", "hessian_s", "func_double_backward_s", "autograd_loop_s", "ggn_s",
                       "hessian/func_db", "hessian/autograd_loop", "ggn/hessian", "hessian_backend", "ggn_backend"])
    if args.json:
        write_json(args.json, {"environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
