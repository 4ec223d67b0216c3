"""Make ``src/ds4sci/data/files/era5_sample.nc.gz``, the embedded ERA5 sample for ClimaX.

Source: ``tests/sample-data/era5-levels-members.grib`` in the cfgrib 0.9.15.1 source
distribution (``pip download --no-deps --no-binary :all: cfgrib==0.9.15.1``): ERA5 ensemble
(10 members) at 2017-01-01 00/12 UTC and 2017-01-02 00/12 UTC, geopotential ``z`` and
temperature ``t`` at 850 and 500 hPa on a 3-degree 61 x 120 grid. Contains modified Copernicus
Climate Change Service information [2017]; see ``src/ds4sci/data/files/ERA5_SAMPLE_NOTICE.txt``.

Kept as read by cfgrib (names ``z``/``t``, dims ``number, time, isobaricInhPa, latitude,
longitude``, CF attributes), so the file goes through the same reader as a user's GRIB. Stored
as netCDF3 (readable by scipy, no system libraries) with CF int16 packing
(``scale_factor``/``add_offset``; quantisation step 1 m^2 s^-2 for z, i.e. 0.1 m of geopotential
height, and 0.01 K for t, far below the ensemble spread of about 12 m^2 s^-2 and 0.25 K), then
gzipped (xarray's scipy backend reads ``.nc.gz``): about 1.9 MB. The fields are smooth but their
14-bit quantised values do not deflate much; ``--members N`` keeps the first N members if a
smaller file is wanted.

Usage: python scripts/make_climax_data.py PATH/era5-levels-members.grib [--members N] [--out OUT]
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import numpy as np
import xarray as xr

OUT = Path(__file__).resolve().parents[1] / "src/ds4sci/data/files/era5_sample.nc.gz"


STEP = {"z": 1.0, "t": 0.01}
"""Quantisation step per variable (units of the variable)."""


def main(grib: str, out: Path = OUT, members: int | None = None) -> None:
    ds = xr.open_dataset(grib, engine="cfgrib").load()
    if members is not None:
        ds = ds.isel(number=slice(0, members))
    keep = {}
    for name in ("z", "t"):
        da = ds[name].astype("float64")
        lo, hi = float(da.min()), float(da.max())
        if (hi - lo) / STEP[name] > 65000:
            raise ValueError(f"{name}: range {lo}..{hi} does not fit int16 with step {STEP[name]}")
        enc = {"dtype": "int16", "scale_factor": STEP[name], "add_offset": float(round((hi + lo) / 2)),
               "_FillValue": np.int16(-32768)}
        keep[name] = (da.astype("float32"), enc)
    new = xr.Dataset({k: v for k, (v, _) in keep.items()})
    new = new.drop_vars([c for c in ("step", "valid_time") if c in new.coords])
    new.attrs = {
        "title": "ERA5 sample: 10 ensemble members x 4 analysis times, z and t at 850/500 hPa, 3 deg",
        "source": "cfgrib 0.9.15.1 sdist, tests/sample-data/era5-levels-members.grib",
        "institution": "European Centre for Medium-Range Weather Forecasts (ECMWF)",
        "references": "Hersbach et al. (2020), The ERA5 global reanalysis, QJRMS 146:1999-2049",
        "license": "Contains modified Copernicus Climate Change Service information [2017]. "
                   "Neither the European Commission nor ECMWF is responsible for any use of this information.",
        "Conventions": "CF-1.7",
    }
    buf = io.BytesIO()
    new.to_netcdf(buf, format="NETCDF3_64BIT", engine="scipy",
                  encoding={k: enc for k, (_, enc) in keep.items()})
    out.write_bytes(gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))
    back = xr.open_dataset(out, engine="scipy").load()
    for name in ("z", "t"):
        err = float(abs(back[name] - ds[name]).max())
        print(f"{name}: max abs quantisation error {err:.4g} {ds[name].attrs.get('units', '')}")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grib")
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    main(args.grib, args.out, args.members)
