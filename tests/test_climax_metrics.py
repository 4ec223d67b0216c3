"""Latitude-weighted metrics on hand-computed cases and against ClimaX's own formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds4sci.models.climax import metrics as M
from ds4sci.models.climax.reference import climax_lat_weighted_mse

LAT = np.array([60.0, 0.0, -60.0])  # cos = 0.5, 1, 0.5 -> weights 0.75, 1.5, 0.75


def test_weights_average_one_and_hand_values():
    w = M.lat_weights(LAT, torch.float64)[:, 0]
    torch.testing.assert_close(w, torch.tensor([0.75, 1.5, 0.75], dtype=torch.float64))
    assert float(M.lat_weights(np.linspace(-88.5, 88.5, 60)).mean()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="degrees"):
        M.lat_weights(np.array([0.0, 100.0]))


def test_constant_error_gives_rmse_c_and_mse_c2():
    y = torch.randn(3, 2, 3, 5)
    for c in (0.5, 2.0):
        rmse = M.lat_weighted_rmse(y + c, y, LAT)
        torch.testing.assert_close(rmse, torch.full((2,), c, dtype=torch.float64))
        s, n = M.lat_weighted_mse_sum(y - c, y, LAT)
        assert float(s / n) == pytest.approx(c * c, rel=1e-6)


def test_rmse_hand_case_per_sample_sqrt():
    # error 1 in the equator row only for sample 0, nothing for sample 1:
    # sample 0: mean over 3x2 of w*e^2 = 1.5*2/6 = 0.5 -> sqrt 0.7071; sample 1: 0 -> mean 0.35355
    y = torch.zeros(2, 1, 3, 2)
    pred = y.clone()
    pred[0, 0, 1] = 1.0
    assert float(M.lat_weighted_rmse(pred, y, LAT)[0]) == pytest.approx(math.sqrt(0.5) / 2)


def test_mse_sum_count_equals_climax_loss():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.randn(4, 3, 3, 6, generator=g), torch.randn(4, 3, 3, 6, generator=g)
    ref = climax_lat_weighted_mse(pred, y, ["a", "b", "c"], LAT)
    s, n = M.lat_weighted_mse_sum(pred, y, LAT)
    torch.testing.assert_close(s / n, ref["loss"])
    ours = M.lat_weighted_mse(pred, y, ["a", "b", "c"], LAT)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k])
    # sums and counts add over micro-batches
    s1, n1 = M.lat_weighted_mse_sum(pred[:1], y[:1], LAT)
    s2, n2 = M.lat_weighted_mse_sum(pred[1:], y[1:], LAT)
    torch.testing.assert_close((s1 + s2) / (n1 + n2), ref["loss"])


def test_acc_perfect_opposite_and_climax_formula():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 2, 3, 4, generator=g)
    clim = torch.randn(2, 3, 4, generator=g)
    torch.testing.assert_close(M.lat_weighted_acc(y, y, clim, LAT), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(M.lat_weighted_acc(2 * clim - y, y, clim, LAT), -torch.ones(2, dtype=torch.float64))
    pred = torch.randn(3, 2, 3, 4, generator=g)
    # ClimaX utils/metrics.lat_weighted_acc written out
    w = torch.from_numpy(np.cos(np.deg2rad(LAT)) / np.cos(np.deg2rad(LAT)).mean()).float()[None, :, None]
    for i in range(2):
        f, a = pred[:, i] - clim[i], y[:, i] - clim[i]
        f, a = f - f.mean(), a - a.mean()
        ref = (w * f * a).sum() / torch.sqrt((w * f**2).sum() * (w * a**2).sum())
        assert float(M.lat_weighted_acc(pred, y, clim, LAT)[i]) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="clim"):
        M.lat_weighted_acc(pred, y, clim[:1], LAT)


def test_baselines_and_errors():
    y = torch.randn(2, 2, 3, 4)
    clim = y.mean(0)
    scores = M.baselines(y, y, clim, LAT, ["a", "b"])
    assert scores["persistence"]["a"]["rmse"] == 0.0 and scores["persistence"]["b"]["acc"] == pytest.approx(1.0)
    assert scores["climatology"]["a"]["rmse"] == pytest.approx(float(M.lat_weighted_rmse(clim.expand_as(y), y, LAT)[0]))
    with pytest.raises(ValueError, match="lat"):
        M.lat_weighted_rmse(y, y, LAT[:2])
    with pytest.raises(ValueError, match="pred"):
        M.lat_weighted_rmse(y, y[:1], LAT)
