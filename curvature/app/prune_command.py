"""``curvature prune``: gradual M-FAC (or magnitude) pruning of the built-in digits CNN, with fine-tuning.

The digits CNN is trained as the report trains it (:func:`curvature.app.builtin.digits_cnn`);
the same seed gives the same train/held-out split (1,437 / 360 images). Each step of the
schedule prunes further with :func:`quant.prune` (gradients from mini-batches of the training
split), prints the held-out accuracy, fine-tunes with Adam while :func:`quant.keep_pruned`
keeps the mask, and prints the accuracy again.

It is the ``prune`` entry of :data:`curvature.app.cli.SUBCOMMANDS`: the command's common options
(``--seed``, ``--quick``, ``--json``, ``--no-progress``, ...) plus :func:`add_arguments`'s own.
``--quick`` keeps the same trained model and lowers the budgets (16 gradients, one recomputation,
10 fine-tuning steps at most).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import quant

from .builtin import digits_cnn, load_digits_tensors
from .errors import UnavailableError

__all__ = ["DigitsSplit", "PruneRecord", "accuracy", "add_arguments", "digits_split", "finetune", "gradient_batches",
           "gradual_prune", "run"]


@dataclass(frozen=True)
class DigitsSplit:
    """The trained digits CNN and its data: the training split (for gradients and fine-tuning), the held-out one."""

    model: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def digits_split(*, seed: int = 0, steps: int = 400) -> DigitsSplit:
    """The built-in digits problem's model with its train/held-out split (the same permutation as its builder).

    Examples:
        >>> split = digits_split(steps=20)
        >>> split.train[0].shape, split.test[0].shape
        (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]))
    """
    problem = digits_cnn(seed=seed, steps=steps)
    x, y = load_digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # as digits_cnn draws it
    train, test = order[:1437], order[1437:]
    return DigitsSplit(problem.model, (x[train], y[train]), (x[test], y[test]))


def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    """Fraction of ``data`` classified correctly (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def gradient_batches(data: tuple[Tensor, Tensor], *, num_batches: int, batch_size: int,
                     generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """``num_batches`` random mini-batches of ``data`` (drawn with ``generator``), for the pruner's gradients."""
    x, y = data
    return [(x[idx], y[idx]) for idx in (torch.randint(0, len(y), (batch_size,), generator=generator)
                                          for _ in range(num_batches))]


def finetune(model: nn.Module, data: tuple[Tensor, Tensor], mask: quant.PruneMask | None, *, steps: int,
             lr: float = 1e-3, batch_size: int = 64, generator: torch.Generator, progress: bool = False) -> None:
    """``steps`` Adam steps on random mini-batches of ``data``; the mask is re-applied after each step."""
    if steps <= 0:
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    handle = quant.keep_pruned(model, mask, optimizer) if mask is not None else None
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    x, y = data
    for _ in tqdm(range(steps), desc="fine-tuning", disable=not progress, leave=False):
        idx = torch.randint(0, len(y), (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    if handle is not None:
        handle.remove()


@dataclass(frozen=True)
class PruneRecord:
    """One step of :func:`gradual_prune`: target and reached sparsity, held-out accuracy before/after fine-tuning."""

    step: int
    target: float
    sparsity: float
    accuracy_pruned: float
    accuracy_finetuned: float
    predicted_loss_increase: float
    seconds: float


def gradual_prune(split: DigitsSplit, schedule: Sequence[float], *, method: str = "mfac", num_gradients: int = 64,
                  damping: float = 1e-4, block_size: int | None = None, recomputations: int = 4,
                  pattern: str | None = None, scope: str = "global", finetune_steps: int = 100, lr: float = 1e-3,
                  batch_size: int = 32, seed: int = 0, progress: bool = False,
                  report: Any = None) -> tuple[list[PruneRecord], quant.PruneMask | None]:
    """Prune ``split.model`` in place along ``schedule``, fine-tuning after each step.

    ``report(record)`` is called after each step (the command prints it). Returns the records
    and the final mask.
    """
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    mask: quant.PruneMask | None = None
    records = []
    for step, target in enumerate(schedule, 1):
        start = time.perf_counter()
        data = gradient_batches(split.train, num_batches=num_gradients, batch_size=batch_size, generator=gen)
        options: dict[str, Any] = dict(method=method, scope=scope, mask=mask)
        if pattern is not None:
            options["pattern"] = pattern
        else:
            options["sparsity"] = target
            options["recomputations"] = recomputations if method == "mfac" else 1
        if method == "mfac":
            options.update(num_gradients=num_gradients, damping=damping, block_size=block_size)
        result = quant.prune(split.model, loss_fn, data, **options)
        mask = result.mask
        pruned_acc = accuracy(split.model, split.test)
        finetune(split.model, split.train, mask, steps=finetune_steps, lr=lr, generator=gen, progress=progress)
        record = PruneRecord(step, target, result.sparsity, pruned_acc, accuracy(split.model, split.test),
                             result.predicted_loss_increase, time.perf_counter() - start)
        records.append(record)
        if report is not None:
            report(record)
    return records, mask


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``curvature prune`` to its parser (the common ones are added by the command)."""
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9],
                   help="the schedule of sparsities (default: %(default)s)")
    p.add_argument("--method", choices=quant.PRUNE_METHODS, default="mfac")
    p.add_argument("--scope", choices=quant.PRUNE_SCOPES, default="global")
    p.add_argument("--pattern", default=None, help="N:M semi-structured sparsity (e.g. 2:4) instead of --sparsities")
    p.add_argument("--num-gradients", type=int, default=64, help="m, gradients per M-FAC step (default: %(default)s)")
    p.add_argument("--damping", type=float, default=1e-4, help="λ of F = λI + GᵀG/m (default: %(default)g)")
    p.add_argument("--block-size", type=int, default=None, help="block-diagonal M-FAC with blocks of B (default: full)")
    p.add_argument("--recomputations", type=int, default=4, help="M-FAC recomputations per step (default: %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=100, help="Adam steps after each pruning step")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: %(default)g)")
    p.add_argument("--save-mask", default=None, help="write the final mask here (quant.PruneMask.load reads it)")


def run(args: argparse.Namespace) -> int:
    """Run ``curvature prune``; returns the exit code (0, or 2 for bad options)."""
    if args.problem != "digits":
        raise UnavailableError(f"curvature prune runs on the built-in digits problem (it fine-tunes on its training "
                               f"split and measures held-out accuracy), not on {args.problem!r}; "
                               "from Python, quant.prune and quant.GradualPruner take any model")
    progress = not args.no_progress
    num_gradients, recomputations, finetune_steps = args.num_gradients, args.recomputations, args.finetune_steps
    if args.quick:  # the same trained model, smaller budgets
        num_gradients, recomputations, finetune_steps = min(num_gradients, 16), 1, min(finetune_steps, 10)
    schedule = [0.5] if args.pattern else list(args.sparsities)
    if any(not 0 <= s < 1 for s in schedule) or any(b < a for a, b in zip(schedule, schedule[1:])):
        print(f"curvature prune: --sparsities must increase within [0, 1), got {schedule}", file=sys.stderr)
        return 2
    if progress:
        print("[curvature] training the digits CNN...", file=sys.stderr, flush=True)
    split = digits_split(seed=args.seed)
    dense = accuracy(split.model, split.test)

    def show(record: PruneRecord) -> None:
        if not args.json:
            print(f"step {record.step}: sparsity {record.sparsity:.3f}  held-out accuracy {record.accuracy_pruned:.3f} "
                  f"pruned, {record.accuracy_finetuned:.3f} after {finetune_steps} fine-tuning steps "
                  f"({record.seconds:.1f} s)", flush=True)

    if not args.json:
        print(f"dense: held-out accuracy {dense:.3f}  ({args.method}, schedule {schedule})", flush=True)
    try:
        records, mask = gradual_prune(
            split, schedule, method=args.method, num_gradients=num_gradients, damping=args.damping,
            block_size=args.block_size, recomputations=recomputations, pattern=args.pattern, scope=args.scope,
            finetune_steps=finetune_steps, lr=args.lr, seed=args.seed, progress=progress, report=show,
        )
    except ValueError as exc:
        print(f"curvature prune: {exc}", file=sys.stderr)
        return 2
    if args.save_mask and mask is not None:
        mask.save(args.save_mask)
    if args.json:
        print(json.dumps({"dense_accuracy": dense, "method": args.method, "steps": [asdict(r) for r in records]},
                         indent=2))
    return 0
