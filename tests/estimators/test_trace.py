import dataclasses
import math

import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

import estimators
from curvature import DenseOperator, as_operator
from estimators import trace
from estimators._products import ProductRunner
from estimators.lowrank import XTraceSketch
from tests.matrices import MATRICES, fast_decay, gen, indefinite, low_rank, psd, with_spectrum

METHOD_BUDGETS = [("hutchinson", 6), ("hutch++", 6), ("xtrace", 6)]


class CallLog(DenseOperator):
    """A dense operator that records the number of columns of every product."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = []

    def _matmat(self, V):
        self.calls.append(V.shape[1])
        return super()._matmat(V)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("matrix", sorted(MATRICES))
@pytest.mark.parametrize("method,budget", METHOD_BUDGETS)
@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_unbiased_over_seeds(matrix, method, budget, distribution):
    A = MATRICES[matrix]()
    values = torch.tensor([
        trace(A, num_matvecs=budget, method=method, distribution=distribution, generator=gen(s)).value
        for s in range(300)
    ])
    se = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - float(A.trace())) < 4 * se


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_single_probe_variance_matches_formula(distribution):
    A = indefinite()
    est = trace(A, num_matvecs=200_000, distribution=distribution, generator=gen(0), probe_batch_size=20_000)
    fro2 = float((A**2).sum())
    expected = 2 * (fro2 - float((A.diagonal() ** 2).sum())) if distribution == "rademacher" else 2 * fro2
    assert float(est.samples.var()) == pytest.approx(expected, rel=0.05)
    assert est.stderr == pytest.approx(math.sqrt(expected / 200_000), rel=0.05)


def test_hutchinson_error_falls_like_inverse_sqrt_m():
    A = psd()
    tr = float(A.trace())

    def rms(m):
        errs = [trace(A, num_matvecs=m, generator=gen(s)).value - tr for s in range(200)]
        return math.sqrt(sum(e * e for e in errs) / len(errs))

    ratio = rms(8) / rms(128)
    assert 3.0 < ratio < 5.3  # sqrt(128 / 8) = 4


@pytest.mark.parametrize("budget", [30, 60, 120])
def test_hutchpp_and_xtrace_beat_hutchinson_on_fast_decay(budget):
    A = fast_decay()
    tr = float(A.trace())
    err = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        errs = [abs(trace(A, num_matvecs=budget, method=method, generator=gen(s)).value - tr) for s in range(60)]
        err[method] = sum(errs) / len(errs) / tr
    assert err["hutch++"] < 0.3 * err["hutchinson"]
    assert err["xtrace"] < 0.3 * err["hutchinson"]
    assert err["xtrace"] <= err["hutch++"]


@pytest.mark.parametrize(
    "method,budget,low",
    [("hutchinson", 30, 0.85), ("hutch++", 30, 0.85), ("xtrace", 30, 0.7)],
)
@pytest.mark.parametrize("matrix", ["psd", "indefinite"])
def test_stderr_is_calibrated(method, budget, low, matrix):
    A = MATRICES[matrix]()
    tr = float(A.trace())
    z = []
    for s in range(200):
        est = trace(A, num_matvecs=budget, method=method, generator=gen(s))
        z.append(abs(est.value - tr) / est.stderr)
    within = sum(v <= 2 for v in z) / len(z)
    # Hutchinson and Hutch++ report a sample standard error (t-distributed); XTrace's own error
    # estimate is known to be optimistic, hence its lower bound.
    assert low <= within <= 0.995


# ---------------------------------------------------------------- exactness and the fast formulas


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchpp_exact_on_rank_k(distribution):
    A = low_rank(100, 9)
    est = trace(A, num_matvecs=27, method="hutch++", distribution=distribution, generator=gen(0))
    assert abs(est.value - float(A.trace())) < 1e-10 * float(A.trace())


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("batch", [None, 3])
def test_xtrace_exact_below_rank_k(distribution, batch):
    A = low_rank(100, 9)
    est = trace(A, num_matvecs=20, method="xtrace", distribution=distribution, generator=gen(0),
                probe_batch_size=batch)
    assert abs(est.value - float(A.trace())) < 1e-10 * float(A.trace())
    assert est.stderr < 1e-10 * float(A.trace())


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_xtrace_exact_on_structured_low_rank_and_zero(distribution):
    # Exact zero rows make the rounding of the sketch structured (the basis must still grow).
    D = torch.diag(torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(50)]).double())
    est = trace(D, num_matvecs=20, method="xtrace", distribution=distribution, generator=gen(0), probe_batch_size=3)
    assert est.value == pytest.approx(6.0, abs=1e-12)
    zero = trace(torch.zeros(20, 20, dtype=torch.float64), num_matvecs=10, method="xtrace", generator=gen(0))
    assert zero.value == 0.0 and zero.stderr == 0.0


def _brute_force_xtrace(A, omega, normalized):
    d, k = omega.shape
    Y = A @ omega
    out = []
    for i in range(k):
        keep = [j for j in range(k) if j != i]
        Qi, _ = torch.linalg.qr(Y[:, keep])
        P = torch.eye(d, dtype=A.dtype) - Qi @ Qi.T
        w = omega[:, i]
        u = P @ w
        scale = (d - k + 1) / float(u @ u) if normalized else 1.0
        out.append(float(torch.trace(Qi.T @ A @ Qi)) + scale * float(u @ A @ u))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("distribution", ["rademacher", "sphere"])
@pytest.mark.parametrize("blocks", [[8], [3, 3, 2]])
def test_xtrace_leave_one_out_formula_matches_brute_force(distribution, blocks):
    A = indefinite(40)
    run = ProductRunner(DenseOperator(A), total=100, progress=False, desc="")
    sketch = XTraceSketch(run, gen(7), distribution)
    for b in blocks:
        sketch.add(b)
    fast = sketch.estimates()
    brute = _brute_force_xtrace(A, sketch.omega, distribution == "sphere")
    assert torch.allclose(fast, brute, rtol=0, atol=1e-12 * float(A.abs().sum()))
    assert run.num_matvecs == 2 * sum(blocks)


# ---------------------------------------------------------------- rtol


@pytest.mark.parametrize("method,budget", [("hutchinson", 600), ("hutch++", 600), ("xtrace", 600), ("auto", 600)])
def test_rtol_stops_early(method, budget):
    A = psd(400)
    op = DenseOperator(A)
    est = trace(op, num_matvecs=budget, method=method, rtol=0.01, generator=gen(0), probe_batch_size=8)
    assert est.converged is True
    assert est.num_matvecs < budget and op.num_matvecs == est.num_matvecs
    assert est.stderr <= 0.01 * abs(est.value)
    assert abs(est.value - float(A.trace())) < 5 * est.stderr + 1e-12


def test_hutchpp_with_a_full_sketch_is_exact():
    A = indefinite(20)
    est = trace(A, num_matvecs=90, method="hutch++", generator=gen(0))
    assert est.value == pytest.approx(float(A.trace()), abs=1e-10) and est.stderr == 0
    assert est.num_matvecs == 40


def test_rtol_unreachable_uses_full_budget():
    A = indefinite()
    op = CallLog(A)
    est = trace(op, num_matvecs=100, rtol=1e-9, generator=gen(0))
    assert est.converged is False and est.num_matvecs == 100
    assert op.calls == [25, 25, 25, 25]  # rtol mode checks after blocks of at most 32
    assert trace(A, num_matvecs=40, generator=gen(0)).converged is None


# ---------------------------------------------------------------- auto


def test_auto_skips_xtrace_whose_state_would_not_fit(monkeypatch):
    """At GPT-2 scale XTrace's float64 test vectors and basis (8 d M bytes) would not fit: auto
    keeps to Hutchinson (O(d) memory) even on a decaying spectrum, where it would pick XTrace."""
    import curvature

    decay = fast_decay()
    d = decay.shape[0]
    monkeypatch.setattr(curvature, "BASIS_BUDGET", 8 * d * 60 - 1)
    est = trace(decay, num_matvecs=60, method="auto", generator=gen(0))
    assert est.method == "auto:hutchinson" and est.num_matvecs == 60
    monkeypatch.setattr(curvature, "BASIS_BUDGET", 8 * d * 60)
    assert trace(decay, num_matvecs=60, method="auto", generator=gen(0)).method == "auto:xtrace"


def test_auto_choices():
    decay, flat = fast_decay(), psd(300)
    assert all(trace(decay, num_matvecs=60, method="auto", generator=gen(s)).method == "auto:xtrace"
               for s in range(10))
    assert sum(trace(flat, num_matvecs=120, method="auto", generator=gen(s)).method == "auto:hutchinson"
               for s in range(10)) >= 8
    flat = indefinite()
    est = trace(flat, num_matvecs=40, method="auto", generator=gen(0))
    assert est.method in ("auto:hutchinson", "auto:xtrace") and est.num_matvecs == 40
    small = trace(flat, num_matvecs=8, method="auto", generator=gen(0))
    assert small.method == "auto:hutchinson"
    op = DenseOperator(flat)
    exact = trace(op, num_matvecs=100, method="auto", generator=gen(0))
    assert exact.method == "auto:exact" and exact.stderr == 0
    assert exact.value == pytest.approx(float(flat.trace()), abs=1e-12)
    assert exact.num_matvecs == op.num_matvecs == 60


@pytest.mark.parametrize(
    "name,eigenvalues,chosen",
    [
        # Spectra and seeds the threshold was NOT tuned on (it was set on i^-1.5, i^-2 and uniform
        # spectra of sizes 60 and 300 with seeds 0-9).
        ("power 1.8, d=400", torch.arange(1, 401, dtype=torch.float64) ** -1.8, "auto:xtrace"),
        ("exponential, d=250", torch.exp(-torch.arange(250, dtype=torch.float64) / 8), "auto:xtrace"),
        ("flat [1, 3], d=500", 1 + 2 * torch.rand(500, dtype=torch.float64, generator=gen(77)), "auto:hutchinson"),
        ("flat [0, 1], d=300", torch.rand(300, dtype=torch.float64, generator=gen(5)), "auto:hutchinson"),
    ],
)
def test_auto_threshold_on_fresh_spectra(name, eigenvalues, chosen):
    A = with_spectrum(eigenvalues, seed=91)
    exact = float(eigenvalues.sum())
    seeds = range(1000, 1040)

    def mse(method):
        values = torch.tensor([trace(A, num_matvecs=60, method=method, generator=gen(s)).value for s in seeds])
        return float(((values - exact) ** 2).mean())

    picks = [trace(A, num_matvecs=60, method="auto", generator=gen(s)).method for s in seeds]
    assert picks.count(chosen) >= 0.8 * len(picks), (name, picks)
    # What the rule is for: never much worse than the better of the two methods at equal cost
    # (flat spectra pay for the pilot's lost basis products and rare XTrace picks: measured 1.1-2.4x;
    # a wrong fallback on a decaying spectrum used to cost 13x).
    assert mse("auto") <= 2.5 * min(mse("hutchinson"), mse("xtrace")), name


def test_auto_is_unbiased_when_it_falls_back():
    A = indefinite()
    values = torch.tensor([trace(A, num_matvecs=24, method="auto", generator=gen(s)).value for s in range(300)])
    se = float(values.std()) / math.sqrt(values.numel())
    assert abs(float(values.mean()) - float(A.trace())) < 4 * se


# ---------------------------------------------------------------- blocks, determinism, inputs


@pytest.mark.parametrize(
    "method,budget,batch,expected",
    [
        ("hutchinson", 20, 7, [7, 7, 6]),
        ("hutchinson", 100, 32, [25, 25, 25, 25]),
        ("hutchinson", 50, None, [50]),
        ("hutchinson", 100, None, [50, 50]),
        ("hutch++", 21, 4, [4, 3, 4, 3, 4, 3]),
        ("xtrace", 12, 4, [3, 3, 3, 3]),
        ("xtrace", 12, None, [6, 6]),
    ],
)
def test_products_are_blocked(method, budget, batch, expected):
    op = CallLog(psd())
    est = trace(op, num_matvecs=budget, method=method, probe_batch_size=batch, generator=gen(0))
    assert op.calls == expected
    assert est.num_matvecs == op.num_matvecs == budget


@pytest.mark.parametrize("method,budget", [("hutchinson", 12), ("hutch++", 12), ("xtrace", 12), ("auto", 40)])
def test_same_seed_same_result_and_global_rng_untouched(method, budget):
    A = indefinite()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = trace(A, num_matvecs=budget, method=method, generator=gen(11))
    torch.manual_seed(999)  # the global RNG must play no part
    b = trace(A, num_matvecs=budget, method=method, generator=gen(11))
    assert a == b and torch.equal(a.samples, b.samples)
    assert trace(A, num_matvecs=budget, method=method, generator=gen(12)).value != a.value
    torch.manual_seed(123)
    trace(A, num_matvecs=budget, method=method)  # a fresh generator, also off the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)


def test_accepts_operators_tensors_scipy_numpy_and_matmul_objects():
    A = indefinite(30)

    class Matmul:
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, V):
            return A @ V

    inputs = [A, DenseOperator(A), as_operator(aslinearoperator(A.numpy())), A.numpy(),
              aslinearoperator(A.numpy()), Matmul()]
    values = [trace(x, num_matvecs=10, generator=gen(3)).value for x in inputs]
    assert all(v == pytest.approx(values[0], rel=1e-12) for v in values)


def test_float32_operator_accumulates_in_float64():
    A = psd(200)
    est32 = trace(A.float(), num_matvecs=50, generator=gen(0))
    est64 = trace(A, num_matvecs=50, generator=gen(0))
    assert isinstance(est32.value, float) and est32.samples.dtype == torch.float64
    assert est32.value == pytest.approx(est64.value, rel=1e-5)
    for method in ("hutch++", "xtrace"):
        v32 = trace(A.float(), num_matvecs=30, method=method, generator=gen(0)).value
        assert v32 == pytest.approx(trace(A, num_matvecs=30, method=method, generator=gen(0)).value, rel=1e-4)


def test_progress_bar_goes_to_stderr_and_nothing_is_printed(capsys):
    trace(psd(), num_matvecs=10, generator=gen(0))
    assert capsys.readouterr().out == ""
    trace(psd(), num_matvecs=10, generator=gen(0), progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "10/10" in captured.err


def test_result_helpers():
    est = trace(indefinite(), num_matvecs=50, generator=gen(0))
    lo, hi = est.confidence_interval(0.95)
    assert lo < est.value < hi and hi - lo == pytest.approx(2 * 1.959964 * est.stderr)
    assert float(est) == est.value and "hutchinson" in str(est)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = 1.0  # frozen
    one = trace(indefinite(), num_matvecs=1, generator=gen(0))
    assert one.stderr == math.inf


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_matvecs=0), ValueError, "num_matvecs"),
        (dict(num_matvecs=-3), ValueError, "num_matvecs"),
        (dict(num_matvecs=2.5), TypeError, "num_matvecs"),
        (dict(num_matvecs=True), TypeError, "num_matvecs"),
        (dict(num_matvecs=10, method="hutch++"), ValueError, "multiple of 3"),
        (dict(num_matvecs=11, method="xtrace"), ValueError, "even"),
        (dict(num_matvecs=200, method="xtrace"), ValueError, "num_matvecs"),
        (dict(num_matvecs=10, method="lanczos"), ValueError, "method"),
        (dict(num_matvecs=10, distribution="uniform"), ValueError, "distribution"),
        (dict(num_matvecs=10, rtol=0.0), ValueError, "rtol"),
        (dict(num_matvecs=10, rtol="x"), TypeError, "rtol"),
        (dict(num_matvecs=10, probe_batch_size=0), ValueError, "probe_batch_size"),
        (dict(num_matvecs=10, generator=0), TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        trace(psd(), **kwargs)


def test_bad_operators():
    with pytest.raises(ValueError, match="square"):
        trace(torch.zeros(3, 4), num_matvecs=2)
    with pytest.raises(ValueError, match="square"):
        trace(torch.zeros(3), num_matvecs=2)
    with pytest.raises(TypeError, match="op"):
        trace("matrix", num_matvecs=2)
    with pytest.raises(TypeError, match="op"):
        trace(torch.eye(3, dtype=torch.int64), num_matvecs=2)
    nonsym = DenseOperator(torch.triu(torch.ones(4, 4, dtype=torch.float64)), symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        trace(nonsym, num_matvecs=4, method="xtrace")
    assert trace(nonsym, num_matvecs=12, method="hutch++", generator=gen(0)).value == pytest.approx(4.0)
    assert trace(nonsym, num_matvecs=3, method="auto", generator=gen(0)).method == "auto:hutchinson"


def test_public_names():
    for name in ("trace", "block_traces", "diagonal", "frobenius_norm", "TraceEstimate", "DiagonalEstimate",
                 "FrobeniusNormEstimate"):
        assert hasattr(estimators, name)
