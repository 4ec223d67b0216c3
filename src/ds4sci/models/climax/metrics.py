"""Latitude-weighted metrics of ClimaX (``src/climax/utils/metrics.py``) and WeatherBench
baselines.

A regular lat-lon grid over-represents the poles; each row is weighted by ``cos(lat)``
normalised to mean 1 over the rows, ``w = cos(lat) / mean(cos(lat))``.

- loss: :func:`lat_weighted_mse_sum` returns ``(sum, count)`` with ``sum / count`` ClimaX's
  ``lat_weighted_mse(...)["loss"]``; sums and counts add over micro-batches and ranks.
- RMSE per variable (and lead time): ``mean over samples of sqrt(mean_{H,W}(w * err^2))`` as
  ClimaX's ``lat_weighted_rmse`` (the square root is taken per sample, then averaged).
- ACC per variable: anomalies against a climatology, centred by their mean over the batch and
  grid, ``sum(w a' f') / sqrt(sum(w f'^2) sum(w a'^2))`` as ClimaX's ``lat_weighted_acc``.
- baselines: persistence (the input is the forecast) and climatology (the climatology is).

Fields ``[B, V, H, W]``; ``lat [H]`` in degrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lat_weights(lat_H, dtype=torch.float32, device=None) -> torch.Tensor:
    """``cos(lat) / mean(cos(lat))`` as ``[H, 1]`` (weights average 1 over the rows)."""
    lat = torch.as_tensor(lat_H, dtype=torch.float64)
    if lat.dim() != 1:
        raise ValueError(f"lat_weights: lat has shape {tuple(lat.shape)}; expected [H] in degrees")
    if lat.abs().max() > 90:
        raise ValueError(f"lat_weights: lat spans {float(lat.min())}..{float(lat.max())}; expected degrees in [-90, 90]")
    w = torch.cos(torch.deg2rad(lat))
    return (w / w.mean()).to(dtype=dtype, device=device).unsqueeze(-1)


def _check(pred, y, lat):
    if pred.shape != y.shape or pred.dim() != 4:
        raise ValueError(f"metrics: pred {tuple(pred.shape)} and y {tuple(y.shape)}; expected equal [B, V, H, W]")
    if len(lat) != pred.shape[-2]:
        raise ValueError(f"metrics: lat has {len(lat)} values; expected H={pred.shape[-2]}")


def lat_weighted_mse_sum(pred_BVHW: torch.Tensor, y_BVHW: torch.Tensor, lat_H) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of w * err^2 over every value, number of values)`` in fp32; differentiable sum."""
    _check(pred_BVHW, y_BVHW, lat_H)
    w = lat_weights(lat_H, device=pred_BVHW.device)
    err = (pred_BVHW.float() - y_BVHW.float()).pow(2)
    return (err * w).sum(), torch.tensor(err.numel(), device=pred_BVHW.device)


def lat_weighted_mse(pred, y, vars: Sequence[str], lat) -> dict[str, torch.Tensor]:
    """ClimaX's ``lat_weighted_mse`` (the training ``metric``): per variable and ``"loss"``."""
    _check(pred, y, lat)
    err = (pred - y).pow(2) * lat_weights(lat, pred.dtype, pred.device)
    out = {var: err[:, i].mean().detach() for i, var in enumerate(vars)}
    out["loss"] = err.mean()
    return out


@torch.no_grad()
def lat_weighted_rmse(pred_BVHW: torch.Tensor, y_BVHW: torch.Tensor, lat_H) -> torch.Tensor:
    """Per variable ``[V]``: mean over samples of the per-sample lat-weighted RMSE (physical
    units if the fields are)."""
    _check(pred_BVHW, y_BVHW, lat_H)
    w = lat_weights(lat_H, torch.float64, pred_BVHW.device)
    err = (pred_BVHW.double() - y_BVHW.double()).pow(2) * w
    return err.mean(dim=(-2, -1)).sqrt().mean(dim=0)


@torch.no_grad()
def lat_weighted_acc(pred_BVHW: torch.Tensor, y_BVHW: torch.Tensor, clim_VHW: torch.Tensor, lat_H) -> torch.Tensor:
    """Per variable ``[V]``: anomaly correlation coefficient against climatology ``clim``."""
    _check(pred_BVHW, y_BVHW, lat_H)
    if tuple(clim_VHW.shape) != tuple(pred_BVHW.shape[1:]):
        raise ValueError(f"lat_weighted_acc: clim has shape {tuple(clim_VHW.shape)}; expected "
                         f"[V, H, W]={tuple(pred_BVHW.shape[1:])}")
    w = lat_weights(lat_H, torch.float64, pred_BVHW.device)
    clim = clim_VHW.double().to(pred_BVHW.device)
    f = pred_BVHW.double() - clim
    a = y_BVHW.double() - clim
    f = f - f.mean(dim=(0, 2, 3), keepdim=True)
    a = a - a.mean(dim=(0, 2, 3), keepdim=True)
    dims = (0, 2, 3)
    return (w * f * a).sum(dims) / ((w * f * f).sum(dims) * (w * a * a).sum(dims)).sqrt()


def evaluate(forecast_BVHW, truth_BVHW, clim_VHW, lat_H, variables: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{variable: {"rmse": ..., "acc": ...}}`` of one lead time."""
    rmse = lat_weighted_rmse(forecast_BVHW, truth_BVHW, lat_H)
    acc = lat_weighted_acc(forecast_BVHW, truth_BVHW, clim_VHW, lat_H)
    return {v: {"rmse": float(rmse[i]), "acc": float(acc[i])} for i, v in enumerate(variables)}


def baselines(inputs_BVHW, truth_BVHW, clim_VHW, lat_H, variables: Sequence[str]) -> dict[str, dict]:
    """Scores of persistence (forecast = the input fields, which must be the output variables)
    and climatology (forecast = ``clim``; its ACC is undefined, reported as NaN)."""
    clim_B = clim_VHW.to(truth_BVHW).expand_as(truth_BVHW)
    persistence = evaluate(inputs_BVHW, truth_BVHW, clim_VHW, lat_H, variables)
    rmse = lat_weighted_rmse(clim_B, truth_BVHW, lat_H)
    climatology = {v: {"rmse": float(rmse[i]), "acc": float("nan")} for i, v in enumerate(variables)}
    return {"persistence": persistence, "climatology": climatology}
