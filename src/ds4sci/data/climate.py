"""Gridded weather/climate fields for ClimaX-style forecasting: readers, statistics, datasets.

Readers (lazy: a sample reads one time slice of each variable, never the whole archive):

* :class:`XarraySource`: NetCDF (``.nc``; ``.nc.gz`` is decompressed into memory once, as gzip
  has no random access: for small files such as the embedded sample), GRIB (``.grib``/``.grib2``, through
  cfgrib) and zarr (``.zarr``) opened with xarray in the WeatherBench / ERA5 layout: one data
  variable per quantity, dims ``[member,] time, [level,] lat, lon`` (the names cfgrib, CDS and
  WeatherBench use are all accepted: ``latitude``/``lat``, ``isobaricInhPa``/``level``/``plev``,
  ``number``/``member``), any number of files along time.
* :class:`NpzSource`: ClimaX's preprocessed shards (``{root}/{split}/*.npz`` with one
  ``[N, 1, H, W]`` array per channel such as ``geopotential_500``, ``{root}/lat.npy``,
  ``{root}/lon.npy``).

Channels are named as ClimaX names them: ``{quantity}_{level}`` for pressure levels
(``geopotential_500``), the quantity alone at the surface (``2m_temperature``); ERA5 short
names (``z``, ``t``, ``t2m`` ...) are recognised.

Then: :func:`normalization_stats` (per-channel mean/std in one streaming pass, float64 Chan
merges), :func:`climatology` (per-channel time mean, for ACC), :class:`ForecastDataset`
(deterministic, indexable input/target pairs at a fixed or a per-index random lead time; lead
time fed as hours/100 as ClimaX does) and :func:`collate`. Grids the patch does not divide go
through :func:`fit_grid` (the crop/pad rule).

The embedded default, :func:`sample_path`, is ERA5 (Copernicus Climate Change Service): see
``files/ERA5_SAMPLE_NOTICE.txt``.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

QUANTITY_ALIASES = {
    "geopotential": ("z", "geopotential"),
    "temperature": ("t", "temperature", "ta"),
    "u_component_of_wind": ("u", "u_component_of_wind", "ua"),
    "v_component_of_wind": ("v", "v_component_of_wind", "va"),
    "specific_humidity": ("q", "specific_humidity", "hus"),
    "relative_humidity": ("r", "relative_humidity", "hur"),
    "2m_temperature": ("t2m", "2t", "2m_temperature", "tas"),
    "10m_u_component_of_wind": ("u10", "10u", "10m_u_component_of_wind"),
    "10m_v_component_of_wind": ("v10", "10v", "10m_v_component_of_wind"),
    "mean_sea_level_pressure": ("msl", "mean_sea_level_pressure"),
    "total_precipitation": ("tp", "total_precipitation"),
    "land_sea_mask": ("lsm", "land_sea_mask"),
    "orography": ("orography", "z_sfc"),
}
"""ClimaX quantity -> names it has in ERA5 (cfgrib/CDS), WeatherBench and CMIP files."""

DIM_ALIASES = {
    "lat": ("latitude", "lat"),
    "lon": ("longitude", "lon"),
    "level": ("isobaricInhPa", "level", "plev", "pressure_level"),
    "time": ("time", "valid_time"),
    "member": ("number", "member", "realization", "ensemble"),
}

SAMPLE_FILE = "era5_sample.nc.gz"
SAMPLE_CHANNELS = ("geopotential_500", "geopotential_850", "temperature_500", "temperature_850")


def sample_path() -> str:
    """Path of the embedded ERA5 sample (10 members x 4 times 12 h apart, 61 x 120, 3 deg)."""
    return str(resources.files("ds4sci.data") / "files" / SAMPLE_FILE)


def split_channel(channel: str) -> tuple[str, float | None]:
    """``"geopotential_500"`` -> ``("geopotential", 500.0)``; ``"2m_temperature"`` -> (it, None)."""
    head, _, tail = channel.rpartition("_")
    if head and tail.replace(".", "", 1).isdigit():
        return head, float(tail)
    return channel, None


def _engine_for(path: str) -> str | None:
    low = path.lower().rstrip("/")
    if low.endswith((".grib", ".grib2", ".grb", ".grb2")):
        return "cfgrib"
    if low.endswith(".zarr"):
        return "zarr"
    if low.endswith(".gz"):
        return "scipy"
    return None


def _find(names: Sequence[str], present) -> str | None:
    return next((n for n in names if n in present), None)


# ----------------------------------------------------------------------------------------------
# Sources


class XarraySource:
    """Channels of one or more xarray-readable files, concatenated along time (sorted).

    ``read(member, t)`` returns ``[C, H, W]`` float32 of that member and global time index,
    reading only those slices. Checked when opened: each channel's variable and level exist, its
    dims end in ``(lat, lon)``, every file has the same grid, members and calendar; checked when
    read: no NaN.
    """

    def __init__(self, paths: str | Sequence[str], channels: Sequence[str], engine: str | None = None):
        import xarray as xr  # optional dependency: pip install ds4sci[climate]

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("XarraySource: paths is empty; expected one or more files")
        self.channels = list(channels)
        if not self.channels:
            raise ValueError("XarraySource: channels is empty; expected names such as 'geopotential_500'")
        self.paths = [os.fspath(p) for p in paths]
        self._files = []  # (path, dataset, {channel: (var name, level index)}, times)
        ref = None
        for path in self.paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"XarraySource: {path!r} does not exist")
            eng = engine or _engine_for(path)
            try:
                if eng == "zarr":
                    ds = xr.open_zarr(path)
                elif path.lower().endswith(".gz"):
                    # gzip has no random access: each slice read would decompress from the start.
                    # Small files only (the embedded sample): decompress once into memory.
                    with gzip.open(path, "rb") as fh:
                        ds = xr.open_dataset(io.BytesIO(fh.read()), engine="scipy")
                else:
                    ds = xr.open_dataset(path, engine=eng)
            except Exception as e:
                raise ValueError(f"XarraySource: cannot open {path!r} with engine {eng or 'auto'}: {e}") from e
            dims = {k: _find(v, ds.dims) for k, v in DIM_ALIASES.items()}
            for need in ("lat", "lon"):
                if dims[need] is None:
                    raise ValueError(f"XarraySource: {path} has no {need} dimension (looked for "
                                     f"{DIM_ALIASES[need]}); dims are {tuple(ds.dims)}")
            lookup = {}
            for ch in self.channels:
                lookup[ch] = self._resolve(path, ds, ch, dims)
            times = ds[dims["time"]].values if dims["time"] else np.array([np.datetime64("NaT")])
            grid = (ds[dims["lat"]].values, ds[dims["lon"]].values)
            members = ds.sizes[dims["member"]] if dims["member"] else 1
            calendar = self._calendar(ds, dims["time"])
            if ref is None:
                ref = (path, grid, members, calendar)
                self.lat, self.lon, self.members, self.calendar = grid[0].astype(np.float64), grid[1].astype(np.float64), members, calendar
            else:
                if grid[0].shape != ref[1][0].shape or grid[1].shape != ref[1][1].shape or \
                        not (np.allclose(grid[0], ref[1][0]) and np.allclose(grid[1], ref[1][1])):
                    raise ValueError(f"XarraySource: {path} has a {len(grid[0])}x{len(grid[1])} grid "
                                     f"(lat {grid[0][0]}..{grid[0][-1]}, lon {grid[1][0]}..{grid[1][-1]}); "
                                     f"{ref[0]} has {len(ref[1][0])}x{len(ref[1][1])} (lat {ref[1][0][0]}.."
                                     f"{ref[1][0][-1]}): grids must match")
                if members != ref[2]:
                    raise ValueError(f"XarraySource: {path} has {members} members; {ref[0]} has {ref[2]}")
                if calendar != ref[3]:
                    raise ValueError(f"XarraySource: {path} uses calendar {calendar!r}; {ref[0]} uses "
                                     f"{ref[3]!r}: calendars must match")
            self._files.append((path, ds, lookup, dims, times))
        self._files.sort(key=lambda f: f[4][0])
        self.times = np.concatenate([f[4] for f in self._files])
        self._index = [(k, j) for k, f in enumerate(self._files) for j in range(len(f[4]))]
        if len(self._files) > 1 and len(self.times) > 1:
            try:
                if not np.all(self.times[1:] > self.times[:-1]):
                    raise ValueError(f"XarraySource: times of {self.paths} overlap or are not increasing")
            except TypeError:
                pass

    @staticmethod
    def _calendar(ds, time_dim) -> str:
        if time_dim is None:
            return "none"
        if np.issubdtype(ds[time_dim].dtype, np.datetime64):
            return "proleptic_gregorian"  # numpy datetimes (the standard/gregorian calendar)
        first = ds[time_dim].values.reshape(-1)[0]
        return str(getattr(first, "calendar", ds[time_dim].encoding.get("calendar", "unknown")))

    def _resolve(self, path, ds, channel, dims):
        quantity, level = split_channel(channel)
        names = QUANTITY_ALIASES.get(quantity, (quantity,))
        var = _find(names, ds.data_vars)
        if var is None and level is not None:  # a surface quantity whose name ends in digits
            quantity, level = channel, None
            var = _find(QUANTITY_ALIASES.get(channel, (channel,)), ds.data_vars)
        if var is None:
            raise ValueError(f"XarraySource: {path} has no variable for channel {channel!r} (looked for "
                             f"{names}); it has {sorted(ds.data_vars)}")
        vdims = ds[var].dims
        if tuple(vdims[-2:]) != (dims["lat"], dims["lon"]):
            raise ValueError(f"XarraySource: {path} variable {var!r} has dims {vdims}; expected the last "
                             f"two to be ({dims['lat']}, {dims['lon']}) (lat, lon): transpose the file")
        allowed = {dims[k] for k in ("time", "member", "level") if dims[k]} | {dims["lat"], dims["lon"]}
        extra = [d for d in vdims if d not in allowed]
        if extra:
            raise ValueError(f"XarraySource: {path} variable {var!r} has unexpected dims {extra} "
                             f"(dims {vdims}); expected [member,] time, [level,] lat, lon")
        level_index = None
        if level is not None:
            if dims["level"] is None or dims["level"] not in vdims:
                raise ValueError(f"XarraySource: {path} variable {var!r} has no level dimension for "
                                 f"channel {channel!r}; dims {vdims}")
            levels = ds[dims["level"]].values.astype(np.float64)
            hits = np.flatnonzero(np.isclose(levels, level))
            if not len(hits):
                raise ValueError(f"XarraySource: {path} variable {var!r} has no level {level:g} for channel "
                                 f"{channel!r}; levels are {levels.tolist()}")
            level_index = int(hits[0])
        elif dims["level"] is not None and dims["level"] in vdims:
            raise ValueError(f"XarraySource: {path} variable {var!r} has levels {ds[dims['level']].values.tolist()}; "
                             f"channel {channel!r} names none: use e.g. '{quantity}_{ds[dims['level']].values[0]:g}'")
        return var, level_index

    def __len__(self) -> int:
        return len(self.times)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.lat), len(self.lon)

    def units(self) -> dict[str, str]:
        _, ds, lookup, _, _ = self._files[0]
        return {ch: str(ds[var].attrs.get("units", "")) for ch, (var, _) in lookup.items()}

    def read(self, member: int, t: int) -> np.ndarray:
        """``[C, H, W]`` float32 of ``member`` at global time index ``t``."""
        if not 0 <= member < self.members or not 0 <= t < len(self):
            raise IndexError(f"XarraySource.read: member={member}, t={t}; expected < {self.members}, < {len(self)}")
        k, j = self._index[t]
        path, ds, lookup, dims, _ = self._files[k]
        out = np.empty((len(self.channels), *self.shape), dtype=np.float32)
        for c, (ch, (var, level_index)) in enumerate(lookup.items()):
            da = ds[var]
            sel = {}
            if dims["time"] and dims["time"] in da.dims:
                sel[dims["time"]] = j
            if dims["member"] and dims["member"] in da.dims:
                sel[dims["member"]] = member
            if level_index is not None:
                sel[dims["level"]] = level_index
            field = np.asarray(da.isel(sel).values, dtype=np.float32)
            if np.isnan(field).any():
                raise ValueError(f"XarraySource: {path} variable {var!r} (channel {ch!r}) has "
                                 f"{int(np.isnan(field).sum())} NaN values at time {self.times[t]} member {member}")
            out[c] = field
        return out


class NpzSource:
    """ClimaX's preprocessed shards: ``{root}/{split}/*.npz`` (sorted; each holds ``[N, 1, H, W]``
    per channel) with ``{root}/lat.npy`` and ``{root}/lon.npy``. One shard is held at a time."""

    def __init__(self, root: str, channels: Sequence[str], split: str = "train"):
        self.channels, self.members, self.calendar = list(channels), 1, "unknown"
        self.paths = sorted(p for p in glob.glob(os.path.join(root, split, "*.npz"))
                            if os.path.basename(p) != "climatology.npz")
        if not self.paths:
            raise FileNotFoundError(f"NpzSource: no .npz shards in {os.path.join(root, split)!r}")
        for name in ("lat", "lon"):
            f = os.path.join(root, f"{name}.npy")
            if not os.path.isfile(f):
                raise FileNotFoundError(f"NpzSource: {f!r} is missing (ClimaX's preprocessing writes it)")
        self.lat, self.lon = np.load(os.path.join(root, "lat.npy")), np.load(os.path.join(root, "lon.npy"))
        self._index, self._cache = [], (None, None)
        for k, path in enumerate(self.paths):
            with np.load(path) as z:
                missing = [ch for ch in self.channels if ch not in z.files]
                if missing:
                    raise ValueError(f"NpzSource: {path} lacks channels {missing}; it has {sorted(z.files)}")
                n = None
                for ch in self.channels:
                    shape = z[ch].shape
                    if len(shape) != 4 or shape[1] != 1 or tuple(shape[2:]) != self.shape:
                        raise ValueError(f"NpzSource: {path} channel {ch!r} has shape {shape}; expected "
                                         f"[N, 1, H={len(self.lat)}, W={len(self.lon)}] (from lat.npy/lon.npy)")
                    if n is not None and shape[0] != n:
                        raise ValueError(f"NpzSource: {path} channel {ch!r} has {shape[0]} times; others have {n}")
                    n = shape[0]
            self._index += [(k, j) for j in range(n)]
        self.times = np.arange(len(self._index))

        self.root, self.split = root, split

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.lat), len(self.lon)

    def __len__(self) -> int:
        return len(self._index)

    def _named(self, path: str) -> dict[str, np.ndarray]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NpzSource: {path!r} is missing (ClimaX's preprocessing writes it)")
        with np.load(path) as z:
            missing = [ch for ch in self.channels if ch not in z.files]
            if missing:
                raise ValueError(f"NpzSource: {path} lacks channels {missing}; it has {sorted(z.files)}")
            return {ch: np.asarray(z[ch], dtype=np.float64) for ch in self.channels}

    def climax_stats(self) -> Stats:
        """ClimaX's own statistics: ``{root}/normalize_mean.npz`` and ``normalize_std.npz``."""
        mean = self._named(os.path.join(self.root, "normalize_mean.npz"))
        std = self._named(os.path.join(self.root, "normalize_std.npz"))
        return Stats(tuple(self.channels), np.array([mean[c].reshape(-1)[0] for c in self.channels]),
                     np.array([std[c].reshape(-1)[0] for c in self.channels]))

    def climax_climatology(self) -> np.ndarray:
        """``[C, H, W]`` from ``{root}/{split}/climatology.npz`` (ClimaX writes it for val/test)."""
        clim = self._named(os.path.join(self.root, self.split, "climatology.npz"))
        return np.stack([clim[c].reshape(self.shape) for c in self.channels])

    def units(self) -> dict[str, str]:
        return {ch: "" for ch in self.channels}

    def read(self, member: int, t: int) -> np.ndarray:
        if member != 0 or not 0 <= t < len(self):
            raise IndexError(f"NpzSource.read: member={member}, t={t}; expected 0, < {len(self)}")
        k, j = self._index[t]
        if self._cache[0] != k:
            with np.load(self.paths[k]) as z:
                self._cache = (k, {ch: z[ch] for ch in self.channels})
        out = np.stack([self._cache[1][ch][j, 0] for ch in self.channels]).astype(np.float32)
        bad = np.isnan(out).any(axis=(1, 2))
        if bad.any():
            raise ValueError(f"NpzSource: {self.paths[k]} channel {self.channels[int(np.argmax(bad))]!r} has NaN "
                             f"values at index {j}")
        return out


def open_source(path: str | Sequence[str], channels: Sequence[str], split: str = "train"):
    """A directory with ``lat.npy`` -> :class:`NpzSource`; anything else -> :class:`XarraySource`."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and os.path.isfile(os.path.join(path, "lat.npy")):
        return NpzSource(os.fspath(path), channels, split)
    return XarraySource(path, channels)


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Stats:
    """Per-channel normalisation statistics (ClimaX's ``normalize_mean``/``normalize_std``)."""

    channels: tuple[str, ...]
    mean: np.ndarray
    """``[C]`` float64."""
    std: np.ndarray
    """``[C]`` float64 (population std over every grid point and sample)."""

    def normalize(self, x_CHW: np.ndarray) -> np.ndarray:
        return ((x_CHW - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32)

    def denormalize(self, x: torch.Tensor, channels: Sequence[str] | None = None) -> torch.Tensor:
        """Normalised ``[..., C, H, W]`` back to physical units (``channels`` picks rows)."""
        idx = [self.channels.index(c) for c in channels] if channels is not None else slice(None)
        mean = torch.as_tensor(self.mean[idx], dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(self.std[idx], dtype=x.dtype, device=x.device)[:, None, None]
        return x * std + mean

    def select(self, channels: Sequence[str]) -> Stats:
        idx = [self.channels.index(c) for c in channels]
        return Stats(tuple(channels), self.mean[idx], self.std[idx])


def _samples(source, members: Sequence[int] | None, times: Sequence[int] | None):
    members = range(source.members) if members is None else members
    times = range(len(source)) if times is None else times
    return [(m, t) for m in members for t in times]


def normalization_stats(source, members=None, times=None) -> Stats:
    """Mean and std per channel over the given samples, one field at a time (Chan et al.'s
    parallel merge of (count, mean, M2) in float64)."""
    n, mean, m2 = 0, None, None
    for m, t in _samples(source, members, times):
        x = source.read(m, t).astype(np.float64).reshape(len(source.channels), -1)
        k = x.shape[1]
        mu = x.mean(axis=1)
        s2 = ((x - mu[:, None]) ** 2).sum(axis=1)
        if mean is None:
            n, mean, m2 = k, mu, s2
        else:
            delta = mu - mean
            total = n + k
            mean = mean + delta * k / total
            m2 = m2 + s2 + delta**2 * n * k / total
            n = total
    if mean is None:
        raise ValueError("normalization_stats: no samples selected")
    std = np.sqrt(m2 / n)
    zero = [c for c, s in zip(source.channels, std) if s == 0]
    if zero:
        raise ValueError(f"normalization_stats: channels {zero} are constant over the samples; their std is 0")
    return Stats(tuple(source.channels), mean, std)


def climatology(source, members=None, times=None) -> np.ndarray:
    """``[C, H, W]`` float64 mean field over the given samples (the reference for ACC)."""
    total, count = None, 0
    for m, t in _samples(source, members, times):
        x = source.read(m, t).astype(np.float64)
        total = x if total is None else total + x
        count += 1
    if total is None:
        raise ValueError("climatology: no samples selected")
    return total / count


# ----------------------------------------------------------------------------------------------
# Grids the patch does not divide


GRID_MODES = ("crop", "pad")


def fitted_size(h: int, w: int, p: int, mode: str = "crop") -> tuple[int, int]:
    """The grid a model with patch ``p`` runs on for an ``h x w`` field: ``"crop"`` keeps the
    first ``floor(h/p)*p`` rows and ``floor(w/p)*p`` columns, ``"pad"`` rounds both up."""
    if mode not in GRID_MODES:
        raise ValueError(f"fit_grid: mode={mode!r}; expected one of {GRID_MODES}")
    if p < 1 or h < p or w < p:
        raise ValueError(f"fit_grid: grid {h}x{w} with patch_size={p}; expected 1 <= p <= min(H, W)")
    if mode == "crop":
        return h // p * p, w // p * p
    return -(-h // p) * p, -(-w // p) * p


def fit_grid(x: torch.Tensor, lat_H, p: int, mode: str = "crop"):
    """Fields ``[..., H, W]`` and latitudes ``[H]`` on the fitted grid.

    ``"crop"`` drops the last rows/columns (ERA5 0.25 deg 721 x 1440, lat 90..-90: the South
    Pole row, whose cos-lat weight is 0). ``"pad"`` appends rows repeating the last one (nothing
    invented beyond the pole) and columns wrapping around the globe (longitude is periodic); the
    added rows' latitudes continue the spacing, clipped to +-90.
    """
    x = torch.as_tensor(x)
    h, w = x.shape[-2:]
    lat = torch.as_tensor(np.asarray(lat_H, dtype=np.float64))
    if lat.shape != (h,):
        raise ValueError(f"fit_grid: lat has shape {tuple(lat.shape)}; expected [H={h}]")
    h2, w2 = fitted_size(h, w, p, mode)
    if mode == "crop":
        return x[..., :h2, :w2], lat[:h2]
    flat = x.reshape(-1, 1, h, w)
    if w2 > w:
        flat = F.pad(flat, (0, w2 - w, 0, 0), mode="circular")
    if h2 > h:
        flat = F.pad(flat, (0, 0, 0, h2 - h), mode="replicate")
    step = lat[-1] - lat[-2] if h > 1 else torch.tensor(0.0, dtype=lat.dtype)
    extra = lat[-1] + step * torch.arange(1, h2 - h + 1, dtype=lat.dtype)
    return flat.reshape(*x.shape[:-2], h2, w2), torch.cat([lat, extra.clamp(-90, 90)])


def restore_grid(pred: torch.Tensor, size: tuple[int, int], mode: str = "crop") -> torch.Tensor:
    """Predictions on the fitted grid back to the original ``size`` (``"pad"``: the padding cut
    off). ``"crop"`` cannot restore dropped rows: the fitted grid is returned, to be scored with
    the fitted latitudes."""
    if mode not in GRID_MODES:
        raise ValueError(f"restore_grid: mode={mode!r}; expected one of {GRID_MODES}")
    return pred[..., : size[0], : size[1]] if mode == "pad" else pred


# ----------------------------------------------------------------------------------------------
# Input/target pairs


class ForecastDataset(torch.utils.data.Dataset):
    """Deterministic, indexable (input, target) pairs of ``source``.

    Item ``i`` is a pair (member m, start time t) with target time ``t + k`` steps: ``k`` is
    ``lead_steps`` when an int, or drawn from ``lead_steps=(k_min, k_max)`` by a generator
    seeded with ``(seed, i)`` (the same every epoch and process). Pairs whose start is in
    ``start_times`` and target in ``target_times`` (time indices; default all) and member in
    ``members`` (default all) are kept. Items: ``x [V_in, H', W']``, ``y [V_out, H', W']``
    (normalised by ``stats``, grid fitted to ``patch_size`` by ``grid_mode``), ``lead_times``
    (hours / 100, as ClimaX feeds it), ``member``, ``time`` (start index).
    """

    def __init__(self, source, variables: Sequence[str], out_variables: Sequence[str], stats: Stats,
                 lead_steps: int | tuple[int, int] = 1, *, members: Sequence[int] | None = None,
                 start_times: Sequence[int] | None = None, target_times: Sequence[int] | None = None,
                 patch_size: int = 1, grid_mode: str = "crop", hours_per_step: float | None = None, seed: int = 0):
        self.source, self.variables, self.out_variables = source, list(variables), list(out_variables)
        missing = [v for v in {*self.variables, *self.out_variables} if v not in source.channels]
        if missing:
            raise ValueError(f"ForecastDataset: variables {missing} are not channels of the source {source.channels}")
        self.stats, self.patch_size, self.grid_mode, self.seed = stats, patch_size, grid_mode, seed
        lo, hi = (lead_steps, lead_steps) if isinstance(lead_steps, int) else tuple(lead_steps)
        if not 1 <= lo <= hi:
            raise ValueError(f"ForecastDataset: lead_steps={lead_steps}; expected k >= 1 or (k_min, k_max), 1 <= k_min <= k_max")
        self.lead_range = (lo, hi)
        if hours_per_step is None:
            if len(source.times) < 2 or not np.issubdtype(np.asarray(source.times).dtype, np.datetime64):
                raise ValueError("ForecastDataset: the source's time step is unknown; pass hours_per_step")
            steps = np.diff(source.times).astype("timedelta64[s]").astype(np.float64) / 3600.0
            if not np.allclose(steps, steps[0]):
                raise ValueError(f"ForecastDataset: times {source.times} are not evenly spaced; pass hours_per_step "
                                 f"and a source with even spacing")
            hours_per_step = float(steps[0])
        self.hours_per_step = hours_per_step
        members = list(range(source.members)) if members is None else list(members)
        starts = set(range(len(source)) if start_times is None else start_times)
        targets = set(range(len(source)) if target_times is None else target_times)
        # Every (member, start) whose whole lead range stays inside the allowed targets.
        self.pairs = [(m, t) for m in members for t in sorted(starts)
                      if all(t + k in targets for k in range(lo, hi + 1))]
        if not self.pairs:
            raise ValueError(f"ForecastDataset: no (member, start) pair has targets {lo}..{hi} steps ahead within "
                             f"target_times={sorted(targets)} (start_times={sorted(starts)}, {len(source)} times)")
        h, w = source.shape
        self.size = fitted_size(h, w, patch_size, grid_mode)
        _, self.lat = fit_grid(torch.zeros(1, h, w), source.lat, patch_size, grid_mode)
        lon = np.asarray(source.lon, dtype=np.float64)
        if grid_mode == "crop":
            self.lon = lon[: self.size[1]]
        else:  # padded columns wrap around the globe: their longitudes continue past 360
            extra = self.size[1] - len(lon)
            self.lon = np.concatenate([lon, lon[:extra] + 360.0])
        self._vin = [source.channels.index(v) for v in self.variables]
        self._vout = [source.channels.index(v) for v in self.out_variables]

    def __len__(self) -> int:
        return len(self.pairs)

    def lead_steps(self, i: int) -> int:
        lo, hi = self.lead_range
        if lo == hi:
            return lo
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return int(torch.randint(lo, hi + 1, (), generator=g))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"ForecastDataset: index {i} out of range for {len(self)} pairs")
        m, t = self.pairs[i % len(self)]
        k = self.lead_steps(i % len(self))
        x = self.stats.normalize(self.source.read(m, t))
        y = self.stats.normalize(self.source.read(m, t + k))
        x_t, _ = fit_grid(torch.from_numpy(x[self._vin]), self.source.lat, self.patch_size, self.grid_mode)
        y_t, _ = fit_grid(torch.from_numpy(y[self._vout]), self.source.lat, self.patch_size, self.grid_mode)
        return {"x": x_t.contiguous(), "y": y_t.contiguous(),
                "lead_times": torch.tensor(k * self.hours_per_step / 100.0, dtype=torch.float32),
                "member": torch.tensor(m), "time": torch.tensor(t)}


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of :class:`ForecastDataset` items into a batch (``x [B, V, H, W]`` ...)."""
    if not items:
        raise ValueError("collate: no items")
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def sample_splits(source) -> dict[str, dict]:
    """The embedded sample's split (4 times 12 h apart, 10 members): train on pairs whose target
    is one of the first three times (every member), validate on pairs whose target is the last
    time, which training never sees. Members of one ensemble share the weather, so a split by
    member would leak; by time, the validation set is 10 forecasts of the same atmosphere."""
    n = len(source)
    return {"train": {"target_times": list(range(n - 1))},
            "val": {"target_times": [n - 1]}}


# ----------------------------------------------------------------------------------------------
# Writing forecasts

STANDARD_NAMES = {"geopotential": "geopotential", "temperature": "air_temperature",
                  "u_component_of_wind": "eastward_wind", "v_component_of_wind": "northward_wind",
                  "specific_humidity": "specific_humidity", "relative_humidity": "relative_humidity",
                  "2m_temperature": "air_temperature", "10m_u_component_of_wind": "eastward_wind",
                  "10m_v_component_of_wind": "northward_wind", "mean_sea_level_pressure": "air_pressure_at_mean_sea_level"}


def write_forecast_netcdf(path: str, forecast, channels: Sequence[str], lat, lon, init_times, lead_hours,
                          units: dict[str, str] | None = None, attrs: dict[str, str] | None = None):
    """Write ``forecast [T_init, T_lead, C, H, W]`` (physical units) to NetCDF (netCDF3 through
    scipy: no system libraries) in the WeatherBench-2 forecast layout: one variable per channel
    with dims ``(time, prediction_timedelta, latitude, longitude)``, coordinates ``time`` (the
    initialisation), ``prediction_timedelta`` (hours), ``valid_time``, ``latitude``/``longitude``
    in degrees, and per variable ``units``, ``long_name``, ``standard_name`` and ``level`` (hPa).
    Returns the written ``xarray.Dataset``."""
    import xarray as xr

    f = np.asarray(forecast.detach().cpu() if isinstance(forecast, torch.Tensor) else forecast, dtype=np.float32)
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    init_times = np.asarray(init_times)
    lead_hours = np.asarray(lead_hours, dtype=np.float64)
    expected = (len(init_times), len(lead_hours), len(channels), len(lat), len(lon))
    if f.shape != expected:
        raise ValueError(f"write_forecast_netcdf: forecast has shape {f.shape}; expected [T_init, T_lead, C, H, W]="
                         f"{expected} from init_times, lead_hours, channels, lat, lon")
    if not np.issubdtype(init_times.dtype, np.datetime64):
        raise ValueError(f"write_forecast_netcdf: init_times has dtype {init_times.dtype}; expected datetime64")
    lead = (lead_hours * 3600).astype("timedelta64[s]")
    coords = {"time": ("time", init_times.astype("datetime64[ns]")),
              "prediction_timedelta": ("prediction_timedelta", lead.astype("timedelta64[ns]")),
              "latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude"}),
              "longitude": ("longitude", lon, {"units": "degrees_east", "standard_name": "longitude"})}
    data = {}
    for c, ch in enumerate(channels):
        quantity, level = split_channel(ch)
        meta = {"units": (units or {}).get(ch, ""), "long_name": ch.replace("_", " ")}
        if quantity in STANDARD_NAMES:
            meta["standard_name"] = STANDARD_NAMES[quantity]
        if level is not None:
            meta["level"] = level
            meta["level_units"] = "hPa"
        data[ch] = (("time", "prediction_timedelta", "latitude", "longitude"), f[:, :, c], meta)
    ds = xr.Dataset(data, coords=coords)
    ds = ds.assign_coords(valid_time=ds["time"] + ds["prediction_timedelta"])
    ds.attrs = {"Conventions": "CF-1.7", "title": "ClimaX forecast", "source": "ds4sci ClimaX", **(attrs or {})}
    ds.to_netcdf(path, engine="scipy", format="NETCDF3_64BIT",
                 encoding={"prediction_timedelta": {"units": "hours", "dtype": "float64"}})
    return ds


def sample_datasets(patch_size: int = 4, lead_steps: int | tuple[int, int] = 1, grid_mode: str = "crop",
                    variables: Sequence[str] = SAMPLE_CHANNELS, out_variables: Sequence[str] = SAMPLE_CHANNELS,
                    path: str | None = None, seed: int = 0) -> dict:
    """The default run's data: ``{"train", "val"}`` :class:`ForecastDataset` of the embedded
    sample (or ``path``) split by :func:`sample_splits`, with ``stats`` and ``climatology``
    (normalised, ``[V_out, H', W']``) from the training times only, ``lat``/``lon`` of the fitted
    grid, ``units`` and the ``source``."""
    source = XarraySource(path or sample_path(), list(dict.fromkeys([*variables, *out_variables])))
    splits = sample_splits(source)
    train_times = splits["train"]["target_times"]
    stats = normalization_stats(source, times=train_times)
    kw = dict(lead_steps=lead_steps, patch_size=patch_size, grid_mode=grid_mode, seed=seed)
    train = ForecastDataset(source, variables, out_variables, stats, **kw, **splits["train"])
    val = ForecastDataset(source, variables, out_variables, stats, **kw, **splits["val"])
    clim = stats.normalize(climatology(source, times=train_times))[[source.channels.index(v) for v in out_variables]]
    clim_t, _ = fit_grid(torch.from_numpy(clim), source.lat, patch_size, grid_mode)
    return {"train": train, "val": val, "stats": stats, "climatology": clim_t, "lat": train.lat,
            "lon": train.lon, "units": source.units(), "source": source}
