"""Blockwise spectra: top eigenvalues and SLQ densities of every parameter block, and how much
the blocks differ (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").

Zhang et al. find that the Hessian's diagonal blocks of a transformer (embeddings, query, key,
value, attention output, MLP, LayerNorm) have very different spectra, while a CNN's blocks look
alike, and they measure this "block heterogeneity" by the Jensen-Shannon distance between the
blocks' spectral densities. :func:`block_spectra` computes all of it in one call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence, Union

import torch
from torch import Tensor

from curvature import LinearOperator, as_operator, match_names
from curvature.checks import check_count
from curvature.probes import make_generator

from ._utils import LOCKSTEP_BUDGET
from .density import SpectralDensity
from .lanczos import lanczos
from .quadrature import MARGIN, default_sigma

__all__ = [
    "BlockSpectrum",
    "BlockSpectra",
    "block_spectra",
    "block_kind",
    "js_distance",
    "js_distance_matrix",
]

logger = logging.getLogger(__name__)

GroupSpec = Union[Literal["parameter", "module", "kind"], Mapping[str, Union[str, Sequence[str]]]]

#: Name fragments that tell a parameter's role, tried in order (first hit wins). They cover
#: Hugging Face GPT-2/BERT/LLaMA, nanoGPT, ``nn.TransformerEncoderLayer`` and plain names.
_KIND_RULES: tuple[tuple[str, str], ...] = (
    ("embedding", r"(^|\.)(wte|wpe|tok_emb|pos_emb|embed\w*|word_embeddings|position_embeddings|"
                  r"token_type_embeddings|embeddings?)(\.|$)"),
    ("layernorm", r"(^|\.)(ln\w*|\w*layer_?norm\w*|\w*norm\d*|rms\w*)(\.|$)"),
    ("attention qkv", r"(^|\.)(c_attn|in_proj\w*|qkv\w*|query_key_value|wqkv)(\.|$)"),
    ("attention query", r"(^|\.)(q|q_proj|query|wq|to_q)(\.|$)"),
    ("attention key", r"(^|\.)(k|k_proj|key|wk|to_k)(\.|$)"),
    ("attention value", r"(^|\.)(v|v_proj|value|wv|to_v)(\.|$)"),
    ("attention output", r"(attn|attention)\w*\.(c_proj|o_proj|out_proj|out|proj|o|wo|output\.dense|dense)(\.|$)"),
    ("mlp", r"(^|\.)(mlp|ffn|feed_forward|intermediate|c_fc|fc\d*|linear[12]|up_proj|down_proj|gate_proj|w[123])"
            r"(\.|$)|output\.dense"),
    ("head", r"(^|\.)(lm_head|head|classifier|decoder|out)(\.|$)"),
)


def block_kind(name: str, module: Any = None) -> str:
    """The role of a parameter in a network, from its name and (if given) its module's type.

    One of ``"embedding"``, ``"attention query"``/``"key"``/``"value"``/``"qkv"`` (fused),
    ``"attention output"``, ``"mlp"``, ``"layernorm"``, ``"head"``, ``"conv"``, ``"linear"`` or
    ``"other"``.

    Examples:
        >>> [block_kind(n) for n in ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
        ...                          "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.bias",
        ...                          "transformer.h.0.ln_1.weight", "h.1.attn.q.weight"]]
        ['embedding', 'attention qkv', 'attention output', 'mlp', 'layernorm', 'attention query']
    """
    if module is not None:
        kind = type(module).__name__
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or kind.endswith(("LayerNorm", "RMSNorm")):
            return "layernorm"
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            return "batchnorm"
    lowered = name.lower()
    for kind, rule in _KIND_RULES:
        if re.search(rule, lowered):
            return kind
    if module is not None:
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return "conv"
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            return "linear"
    return "other"


def js_distance(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon distance ``√JS(p, q)`` (natural logarithm, so in ``[0, √ln 2]``) of two
    discrete distributions (normalized here), as :func:`scipy.spatial.distance.jensenshannon`.

    ``JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = (p + q)/2``.

    Examples:
        >>> round(js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) ** 2 / math.log(2), 12)
        1.0
    """
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()
    # Subnormal masses would make m = (p + q)/2 round to 0 beside p > 0 (an infinite KL term);
    # they carry no mass worth keeping.
    tiny = torch.finfo(torch.float64).tiny
    p, q = torch.where(p < tiny, 0.0, p), torch.where(q < tiny, 0.0, q)
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        pos = a > 0
        return (a[pos] * (a[pos] / m[pos]).log()).sum()

    return math.sqrt(max(float(kl(p) + kl(q)) / 2, 0.0))


def js_distance_matrix(masses: Tensor) -> Tensor:
    """Pairwise :func:`js_distance` of the rows of ``masses`` (``(B, G)``, each row a
    distribution over the same ``G`` cells).

    Examples:
        >>> js_distance_matrix(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])).diagonal().tolist()
        [0.0, 0.0, 0.0]
    """
    B = masses.shape[0]
    out = torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(i + 1, B):
            out[i, j] = out[j, i] = js_distance(masses[i], masses[j])
    return out


@dataclass(frozen=True, eq=False)
class BlockSpectrum:
    """The spectrum of one diagonal block ``H_bb`` of a curvature operator.

    Attributes:
        name: the block's label (a parameter name, a module name, a kind or a key of ``groups``).
        params: the parameter names in the block.
        kind: the role of its parameters (:func:`block_kind`; ``"mixed"`` when they differ).
        dim: the block's size.
        eigenvalues: ``(k,)`` float64 largest Ritz values of the first probe's Lanczos run
            (descending; empty when ``k=0``).
        converged: ``(k,)`` bool, whether each met the residual tolerance (exact when the run
            covered the whole block).
        density: the block's SLQ density.
    """

    name: str
    params: tuple[str, ...]
    kind: str
    dim: int
    eigenvalues: Tensor
    converged: Tensor
    density: SpectralDensity


@dataclass(frozen=True, eq=False)
class BlockSpectra:
    """Blockwise spectra of an operator and their heterogeneity (see :func:`block_spectra`).

    Attributes:
        blocks: one :class:`BlockSpectrum` per block, in the operator's parameter order.
        grid: ``(G,)`` the common uniform grid over all blocks' nodes.
        masses: ``(B, G)`` each block's density, broadened with ``sigma``, as a distribution over
            the grid points (rows summing to 1).
        js_distances: ``(B, B)`` pairwise Jensen-Shannon distances of the rows of ``masses``.
        num_matvecs: columns of products with the full operator (in wide products).
        sigma: the kernel standard deviation of the compared densities.
        metadata: settings of the run.
    """

    blocks: tuple[BlockSpectrum, ...]
    grid: Tensor
    masses: Tensor
    js_distances: Tensor
    num_matvecs: int
    sigma: float
    metadata: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The blocks' labels."""
        return [b.name for b in self.blocks]

    @property
    def heterogeneity(self) -> float:
        """Mean Jensen-Shannon distance over pairs of distinct blocks (0: all alike; at most
        ``√ln 2 ≈ 0.833``: disjoint spectra). ``nan`` with a single block."""
        B = len(self.blocks)
        if B < 2:
            return float("nan")
        return float(self.js_distances.sum() / (B * (B - 1)))

    def with_sigma(self, sigma: float, *, num_points: int | None = None) -> BlockSpectra:
        """The same blocks compared under another kernel width (no new products).

        The heterogeneity depends on ``sigma``: a wide kernel merges blocks whose eigenvalues
        all sit below it, a kernel narrower than the Ritz-value spacing of ``num_steps`` steps
        compares quadrature nodes rather than spectra. Compare models at one absolute ``sigma``.
        """
        n = int(self.metadata.get("num_points", 2048)) if num_points is None else num_points
        grid, masses, sigma = _common_grid([b.density for b in self.blocks], sigma, n,
                                           int(self.metadata.get("num_steps", 2)))
        return dataclasses.replace(self, grid=grid, masses=masses, js_distances=js_distance_matrix(masses),
                                   sigma=sigma, metadata={**self.metadata, "num_points": n})

    def __getitem__(self, name: str) -> BlockSpectrum:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r}; blocks: {self.names}")

    def plot(self, **kwargs: Any) -> Any:
        """One figure of the per-block densities and the JS-distance matrix
        (:func:`spectra.plotting.plot_block_spectra`); returns the figure."""
        from .plotting import plot_block_spectra

        return plot_block_spectra(self, **kwargs)

    def __repr__(self) -> str:
        return (f"BlockSpectra({len(self.blocks)} blocks, heterogeneity={self.heterogeneity:.4f}, "
                f"num_matvecs={self.num_matvecs})")


def _module_of(model: Any, name: str) -> Any:
    """The module holding parameter ``name`` (``None`` without a model or for a foreign name)."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        return model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
    except AttributeError:
        return None


def _groups(op: LinearOperator, groups: GroupSpec) -> list[tuple[str, list[str], str]]:
    """``[(label, parameter names, kind)]`` in the operator's order."""
    names = [b.name for b in op.blocks]
    model = getattr(op, "model", None)
    kinds = {n: block_kind(n, _module_of(model, n)) for n in names}
    if isinstance(groups, Mapping):
        out = []
        taken: dict[str, str] = {}
        for label, patterns in groups.items():
            members = match_names(names, patterns, option="groups")
            for m in members:
                if m in taken:
                    raise ValueError(f"groups: parameter {m!r} is in both {taken[m]!r} and {label!r}")
                taken[m] = label
            member_kinds = {kinds[m] for m in members}
            out.append((str(label), members, member_kinds.pop() if len(member_kinds) == 1 else "mixed"))
        return out
    if groups == "parameter":
        return [(n, [n], kinds[n]) for n in names]
    if groups == "module":
        by_module: dict[str, list[str]] = {}
        for n in names:
            by_module.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
        return [(m, ps, kinds[ps[0]] if len({kinds[p] for p in ps}) == 1 else "mixed")
                for m, ps in by_module.items()]
    if groups == "kind":
        by_kind: dict[str, list[str]] = {}
        for n in names:
            by_kind.setdefault(kinds[n], []).append(n)
        return [(k, ps, k) for k, ps in by_kind.items()]
    raise ValueError(f"groups must be 'parameter', 'module', 'kind' or a dict label -> patterns, got {groups!r}")


def _common_grid(densities: Sequence[SpectralDensity], sigma: float | None, num_points: int,
                 num_steps: int) -> tuple[Tensor, Tensor, float]:
    """One uniform grid over all blocks' nodes, the ONE kernel width all blocks are broadened
    with, and each block's density as cell masses on the grid (rows summing to 1).

    One width for all blocks (Zhang et al. use a fixed one): with a width per block, relative to
    each block's own range, two blocks of the same near-zero spectrum at different tiny scales
    would look as different as can be.
    """
    lo = min(d.support()[0] for d in densities)
    hi = max(d.support()[1] for d in densities)
    if sigma is None:
        sigma = default_sigma(lo, hi, num_steps)
    elif not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    pad = max(MARGIN * (hi - lo), 5 * sigma)
    grid = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)
    rows = []
    for d in densities:
        _, p = d.evaluate(grid, sigma=sigma, normalize=False)
        if not (torch.isfinite(p).all() and p.sum() > 0):
            raise ValueError("a block's density vanishes on the common grid; pass a larger sigma")
        rows.append(p / p.sum())
    return grid, torch.stack(rows), float(sigma)


class _BlockDiagonal(LinearOperator):
    """``D = Σ_g P_g H P_g``: the block-diagonal part of ``H`` on disjoint index sets.

    A column supported in one block costs one column of ``H @ ·``, so Lanczos runs of all blocks,
    each started inside its block (where ``D``'s Krylov space stays), advance in lockstep through
    one wide product per step: the model's forward and first backward are shared by all blocks.
    Other columns (restarts after a breakdown) are split into their blocks' parts.
    """

    def __init__(self, base: LinearOperator, index_sets: Sequence[Tensor]):
        super().__init__(base.shape[0], base.dtype, base.device, base.blocks)
        self.base = base
        self.is_symmetric = True
        owner = torch.full((base.shape[0],), -1, dtype=torch.long, device=base.device)
        for g, idx in enumerate(index_sets):
            owner[idx.to(base.device)] = g
        self._owner = owner

    def _matmat(self, V: Tensor) -> Tensor:
        pairs = []
        for j in range(V.shape[1]):
            touched = torch.unique(self._owner[V[:, j] != 0])
            pairs.extend((j, int(g)) for g in touched.tolist() if g >= 0)
        out = torch.zeros_like(V)
        if not pairs:
            return out
        masks = {g: self._owner == g for _, g in pairs}
        E = torch.zeros(V.shape[0], len(pairs), dtype=V.dtype, device=V.device)
        for c, (j, g) in enumerate(pairs):
            E[masks[g], c] = V[masks[g], j]
        W = self.base @ E
        for c, (j, g) in enumerate(pairs):
            out[masks[g], j] += W[masks[g], c]
        return out


def _top_ritz(alpha: Tensor, beta: Tensor, k: int, tol: float, exact: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` largest Ritz values of one Lanczos run and whether each is converged.

    Only the first block of ``T`` (up to a breakdown) is used: after a breakdown the run continued
    from a random vector, whose Ritz values belong to other blocks of ``D``. A breakdown or a run
    over the whole block (``exact``) gives eigenvalues exactly; otherwise the last step's
    ``β_m`` bounds the residuals of the leading ``m − 1`` steps' Ritz pairs, ``|β_m y_{m-1,j}|``
    (Parlett; exact in exact arithmetic with full reorthogonalization), compared with
    ``tol·max|θ|``.
    """
    m = alpha.shape[0]
    zero = (beta == 0).nonzero()
    if len(zero):
        stop, bound = int(zero[0]) + 1, None
    elif exact or m == 1:
        stop, bound = m, None
    else:
        stop, bound = m - 1, float(beta[m - 2])
    T = torch.diag(alpha[:stop])
    if stop > 1:
        T = T + torch.diag(beta[: stop - 1], 1) + torch.diag(beta[: stop - 1], -1)
    theta, Y = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)[:k]
    values = theta[order]
    if bound is None:
        return values, torch.ones(len(order), dtype=torch.bool)
    residuals = bound * Y[-1, order].abs()
    scale = max(float(theta.abs().max()), 1e-300)
    return values, residuals <= tol * scale


def block_spectra(
    op: Any,
    *,
    groups: GroupSpec = "parameter",
    k: int = 3,
    num_probes: int = 1,
    num_steps: int = 40,
    sigma: float | None = None,
    num_points: int = 2048,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> BlockSpectra:
    """Top eigenvalues and the SLQ density of every diagonal block of ``op``, with the
    Jensen-Shannon distances between the blocks' densities (Zhang et al. 2024).

    Each block ``H_bb`` (the principal submatrix on some parameters, as :func:`spectra.restrict`)
    gets ``num_probes`` Lanczos runs with full reorthogonalization from Rademacher vectors inside
    the block (SLQ, as :func:`spectra.slq`); the first run's largest Ritz values are the block's
    top eigenvalues, with a converged flag from their residual bound (one extra Lanczos step).
    All blocks advance in lockstep: each step is ONE product of the full operator with a block of
    ``num_blocks · num_probes`` columns (for a Hessian: one forward and first backward shared by
    all columns), as Zhang et al.'s code does. The densities, all broadened with ONE Gaussian
    kernel (``sigma``), are evaluated on one uniform grid and compared by the Jensen-Shannon
    distance;
    :attr:`BlockSpectra.heterogeneity` is the mean over pairs.

    Cost: ``min(num_steps + 1, d_b)`` wide products of ``num_blocks · num_probes`` columns;
    memory: the lockstep basis, ``num_blocks · num_probes · num_steps · d`` numbers (run in turns
    above 1 GiB).

    Args:
        op: a symmetric operator with parameter blocks (``Hessian``, ``GGN``, ...).
        groups: ``"parameter"`` (one block per parameter tensor, as Zhang et al.), ``"module"``
            (weight and bias together), ``"kind"`` (all parameters of one role together:
            embeddings, attention query/key/value/output, MLP, LayerNorm, ...; see
            :func:`block_kind`), or a dict ``label -> name or glob pattern(s)``.
        k: top eigenvalues per block (0: none).
        num_probes: SLQ probes per block.
        num_steps: Lanczos steps per probe (capped at the block size).
        sigma: the kernel standard deviation every block's density is broadened with for the
            comparison; default :func:`spectra.default_sigma` of the range of all blocks' nodes.
        num_points: points of the common grid.
        tol: an eigenvalue counts as converged when its residual bound is below ``tol`` times
            the block's largest Ritz value magnitude.
        generator: source of all randomness (the probes, block by block, then a restart seed).

    Examples:
        >>> from curvature import DenseOperator, make_blocks
        >>> H = DenseOperator(torch.diag(torch.tensor([1., 2., 3., 10., 20.], dtype=torch.float64)),
        ...                   blocks=make_blocks(["a", "b"], [(3,), (2,)]))
        >>> res = block_spectra(H, k=1, num_steps=3, generator=torch.Generator().manual_seed(0))
        >>> [round(float(b.eigenvalues[0]), 6) for b in res.blocks], round(res.heterogeneity, 1)
        ([3.0, 20.0], 0.7)
    """
    A = as_operator(op)
    k = check_count(k, name="k", minimum=0)
    num_probes = check_count(num_probes, name="num_probes")
    num_steps = check_count(num_steps, name="num_steps")
    num_points = check_count(num_points, name="num_points", minimum=2)
    g = make_generator(generator)
    plan = _groups(A, groups)
    if not plan:
        raise ValueError("block_spectra: the operator has no blocks")
    slices = {b.name: b.slice for b in A.blocks}
    index_sets = [torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in members])
                  for _, members, _ in plan]
    D = _BlockDiagonal(A, index_sets)
    d = A.shape[0]
    # One more step than asked where the block allows it: its β bounds the top Ritz residuals.
    steps = [min(num_steps + 1, len(idx)) for idx in index_sets]
    columns = [(b, i) for b in range(len(plan)) for i in range(num_probes)]
    starts = {}
    for b, i in columns:  # Rademacher probes inside each block, drawn in a fixed order
        v = torch.zeros(d, dtype=A.dtype, device=A.device)
        signs = torch.randint(0, 2, (len(index_sets[b]),), generator=g).to(A.dtype) * 2 - 1
        v[index_sets[b].to(A.device)] = signs.to(A.device)
        starts[(b, i)] = v
    restart_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    runs: dict[int, list[tuple[int, int]]] = {}
    for b, i in columns:
        runs.setdefault(steps[b], []).append((b, i))
    itemsize = torch.empty(0, dtype=A.dtype).element_size()
    tridiagonals: dict[tuple[int, int], tuple[Tensor, Tensor, float]] = {}
    matvecs = 0
    for m, cols in sorted(runs.items()):
        width = max(1, min(len(cols), LOCKSTEP_BUDGET // max(1, m * d * itemsize)))
        for first in range(0, len(cols), width):
            chunk = cols[first: first + width]
            logger.info("blockwise Lanczos: %d columns x %d steps", len(chunk), m)
            res = lanczos(D, num_steps=m, v0=torch.stack([starts[c] for c in chunk], dim=1),
                          generator=torch.Generator().manual_seed(restart_seed + first + m))
            matvecs += res.num_matvecs
            for c, col in enumerate(chunk):
                tridiagonals[col] = (res.alpha[c], res.beta[c], float(res.start_norms[c]) ** 2)
    results: list[BlockSpectrum] = []
    for b, (label, members, kind) in enumerate(plan):
        nodes, weights, norms = [], [], []
        for i in range(num_probes):
            alpha, beta, norm_sq = tridiagonals[(b, i)]
            T = torch.diag(alpha)
            if len(beta):
                T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
            theta, Y = torch.linalg.eigh(T)
            nodes.append(theta)
            weights.append(Y[0] ** 2)
            norms.append(norm_sq)
        d_b = len(index_sets[b])
        density = SpectralDensity(torch.stack(nodes), torch.stack(weights), d_b, torch.tensor(norms),
                                  num_matvecs=num_probes * steps[b],
                                  metadata={"block": label, "num_steps": steps[b]})
        alpha, beta, _ = tridiagonals[(b, 0)]
        values, converged = _top_ritz(alpha, beta, min(k, d_b), tol, exact=steps[b] == d_b)
        results.append(BlockSpectrum(label, tuple(members), kind, d_b, values, converged, density))
    grid, masses, sigma = _common_grid([b.density for b in results], sigma, num_points, num_steps)
    return BlockSpectra(
        tuple(results), grid, masses, js_distance_matrix(masses), matvecs, sigma,
        {"groups": groups if isinstance(groups, str) else dict(groups), "k": k, "num_probes": num_probes,
         "num_steps": num_steps, "num_points": num_points, "tol": tol},
    )
