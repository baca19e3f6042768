"""quant's public surface: every exported name indexed in the package docstring; solvers not exported."""

import quant


def test_every_public_name_is_indexed_in_the_docstring():
    assert [n for n in quant.__all__ if f"`{n}`" not in quant.__doc__] == []


def test_solver_internals_are_not_exported():
    for name in ("solve_dp", "dp_frontier", "solve_ilp", "solve_knapsack", "knapsack_frontier"):
        assert not hasattr(quant, name) or name not in quant.__all__
        assert name not in quant.__all__
    from quant.solvers import knapsack_frontier, solve_ilp, solve_knapsack  # noqa: F401
