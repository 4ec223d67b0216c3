"""The end of a ClimaX run: forecast skill on the validation pairs in physical units, per
variable, against persistence and climatology (latitude-weighted RMSE and ACC, as ClimaX and
WeatherBench score), printed as a table and written to ``climax_eval.json``, and maps of truth,
forecast and error for the first validation forecast (``climax_maps.png``)."""

from __future__ import annotations

import json

import numpy as np
import torch


@torch.no_grad()
def evaluate_run(task, trainer) -> dict:
    from ...models.climax.metrics import baselines, evaluate

    cfg = trainer.cfg
    data = task.data(cfg)
    val, stats, lat = data["val"], data["stats"], data["lat"]
    model = trainer.model.eval()
    preds, truths, inputs = [], [], []
    for i in range(len(val)):
        x, y, lead = (t.to(trainer.device) for t in task.collate([val[i]]))
        preds.append(model.predict(x, lead, task.variables, task.out_variables).float().cpu())
        truths.append(y.cpu())
        inputs.append(x.cpu())
    model.train()
    pred = stats.denormalize(torch.cat(preds), task.out_variables)
    truth = stats.denormalize(torch.cat(truths), task.out_variables)
    clim = stats.denormalize(data["climatology"].float(), task.out_variables)
    result = {"lead_hours": cfg.data.lead_steps * val.hours_per_step, "forecasts": len(val),
              "model": evaluate(pred, truth, clim, lat, task.out_variables)}
    if set(task.out_variables) <= set(task.variables):
        x = torch.cat(inputs)[:, [task.variables.index(v) for v in task.out_variables]]
        result.update(baselines(stats.denormalize(x, task.out_variables), truth, clim, lat, task.out_variables))
    (trainer.out / "climax_eval.json").write_text(json.dumps(result, indent=1))
    _print_table(result, data["units"])
    _maps(pred[0], truth[0], task.out_variables, data["units"], lat, data["lon"], trainer.out / "climax_maps.png",
          result["lead_hours"])
    return result


def _print_table(result: dict, units: dict) -> None:
    print(f"validation forecasts at +{result['lead_hours']:.0f} h ({result['forecasts']} forecasts), "
          f"latitude-weighted, physical units:")
    names = [n for n in ("model", "persistence", "climatology") if n in result]
    print(f"  {'variable':<18}" + "".join(f"{n + ' RMSE':>18}" for n in names) +
          "".join(f"{n + ' ACC':>16}" for n in names if n != "climatology") + "  units")
    for var in result["model"]:
        row = f"  {var:<18}" + "".join(f"{result[n][var]['rmse']:>18.4g}" for n in names)
        row += "".join(f"{result[n][var]['acc']:>16.3f}" for n in names if n != "climatology")
        print(row + f"  {units.get(var, '')}")


def _maps(pred, truth, variables, units, lat, lon, path, lead_hours) -> None:
    from ..metrics import plot_backend

    plt = plot_backend()
    n = len(variables)
    fig, axes = plt.subplots(n, 3, figsize=(12, 2.4 * n + 0.6), squeeze=False)
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    extent = (float(lon.min()), float(lon.max()), float(lat.min()), float(lat.max()))
    for row, var in enumerate(variables):
        t, f = truth[row].numpy(), pred[row].numpy()
        lo, hi = float(min(t.min(), f.min())), float(max(t.max(), f.max()))
        err = f - t
        bound = float(np.abs(err).max())
        for col, (img, title, kw) in enumerate(((t, "truth", dict(vmin=lo, vmax=hi, cmap="viridis")),
                                                (f, f"forecast +{lead_hours:.0f} h", dict(vmin=lo, vmax=hi, cmap="viridis")),
                                                (err, "error", dict(vmin=-bound, vmax=bound, cmap="RdBu_r")))):
            ax = axes[row, col]
            im = ax.imshow(img, extent=extent, aspect="auto", **kw)
            ax.set_title(f"{var} {title}", fontsize=9)
            fig.colorbar(im, ax=ax, label=units.get(var, ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def forecast(run: str, steps: int, out: str, num_inits: int = 1):
    """Roll the model of a ``ds4sci train climax`` run out ``steps`` times its lead time from the
    first ``num_inits`` validation initial states, and write the forecast (physical units) to
    NetCDF with coordinates, units and attributes (``data.climate.write_forecast_netcdf``).
    Autoregressive: each step's forecast is the next step's input, so the run must forecast the
    variables it reads."""
    from pathlib import Path

    from ...data.climate import write_forecast_netcdf
    from ..task import get_task

    if steps < 1 or num_inits < 1:
        raise ValueError(f"forecast: --steps={steps}, --inits={num_inits}; expected >= 1")
    if Path(out).is_dir():
        raise ValueError(f"forecast: --out={out!r} is a directory; expected a .nc file path")
    task = get_task("climax")
    try:
        model, cfg = task.load_model(run)
    except ValueError as err:
        raise ValueError(f"forecast: {err}") from None
    data = task.data(cfg)
    if list(task.variables) != list(task.out_variables):
        raise ValueError(f"forecast: the run maps {task.variables} to {task.out_variables}; an autoregressive "
                         "rollout needs the same input and output variables")
    val, stats = data["val"], data["stats"]
    num_inits = min(num_inits, len(val))
    frames, inits = [], []
    for i in range(num_inits):
        x, _, lead = task.collate([val[i]])
        lead_frames = []
        for _ in range(steps):
            x = model.predict(x, lead, task.variables, task.out_variables)
            lead_frames.append(stats.denormalize(x[0], task.out_variables))
        frames.append(torch.stack(lead_frames))
        inits.append(np.asarray(data["source"].times)[val.pairs[i][1]])
    hours = round(float(lead[0]) * 100.0, 4)  # lead_times are hours / 100 in fp32
    write_forecast_netcdf(out, torch.stack(frames), task.out_variables, data["lat"], data["lon"],
                          np.array(inits), [hours * (k + 1) for k in range(steps)], units=data["units"],
                          attrs={"model_run": str(run), "lead_time_hours_per_step": str(hours)})
    return out
