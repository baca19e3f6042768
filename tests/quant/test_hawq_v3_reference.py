"""Regression against the HAWQ-V3 ILP reference data (ResNet18 arrays of Zhen-Dong/HAWQ's ILP.ipynb).

19 layers (first and last excluded), traces already divided by n_i, ‖ΔW‖² at 4 and 8 bits,
downsample convs tied to main-path layers (4, 6), (9, 11), (14, 16); budgets
``R(4-bit) + α (R(8-bit) − R(4-bit))``. Expected plans and objectives from the reference solve.
"""

import numpy as np
import pytest

from quant import solvers

TRACE = np.array([0.06857826, 0.03162379, 0.03298575, 0.01205663, 0.02222431, 0.00596336, 0.06931772, 0.00807129,
                  0.00372905, 0.00530698, 0.00209011, 0.00737569, 0.00210454, 0.00151197, 0.00158041, 0.00078146,
                  0.00451841, 0.00098745, 0.00072944])
DW8 = np.array([0.0235, 0.0125, 0.0102, 0.0082, 0.0145, 0.0344, 0.0023, 0.0287, 0.0148, 0.0333, 0.0682, 0.0027, 0.0448,
                0.0336, 0.0576, 0.1130, 0.0102, 0.0947, 0.0532])
DW4 = np.array([6.7430, 3.9691, 3.3281, 2.6796, 4.7277, 10.5966, 0.6827, 9.0942, 4.8857, 10.7599, 21.7546, 0.8603,
                14.5324, 10.9651, 18.7706, 36.4044, 3.1572, 29.6994, 17.4016])
PARAMS = np.array([36864, 36864, 36864, 36864, 73728, 147456, 8192, 147456, 147456, 294912, 589824, 32768, 589824,
                   589824, 1179648, 2359296, 131072, 2359296, 2359296], dtype=float)
BOPS = np.array([115605504, 115605504, 115605504, 115605504, 57802752, 115605504, 6422528, 115605504, 115605504,
                 57802752, 115605504, 6422528, 115605504, 115605504, 57802752, 115605504, 6422528, 115605504,
                 115605504], dtype=float)
TIES = [(4, 6), (9, 11), (14, 16)]
OMEGA = np.stack([TRACE * DW4, TRACE * DW8], axis=1)  # choices: 4 bits, 8 bits


def limit(table, alpha):
    return table[:, 0].sum() + alpha * (table[:, 1].sum() - table[:, 0].sum())


@pytest.mark.parametrize("alpha, bits, objective", [
    (0.5, [8] * 15 + [4, 8, 4, 4], 0.0745),
    (0.25, [8] * 14 + [4] * 5, 0.1183),
    (0.75, [8] * 13 + [4, 8, 8, 8, 8, 4], 0.0334),
])
def test_size_constrained_ilp_reproduces_reference(alpha, bits, objective):
    size = np.stack([PARAMS * 4 / 8, PARAMS * 8 / 8], axis=1)
    choice, value = solvers.solve_ilp(OMEGA, [(size, limit(size, alpha))], ties=TIES)
    assert [(4, 8)[k] for k in choice] == bits
    assert value == pytest.approx(objective, abs=1e-4)
    for i, j in TIES:
        assert choice[i] == choice[j]


def test_bops_constrained_ilp_reproduces_reference():
    bops = np.stack([BOPS / 64, BOPS / 16], axis=1)
    choice, value = solvers.solve_ilp(OMEGA, [(bops, limit(bops, 0.5))], ties=TIES)
    assert value == pytest.approx(0.2157, abs=1e-4)
    assert sum(bops[i, k] for i, k in enumerate(choice)) <= limit(bops, 0.5)
