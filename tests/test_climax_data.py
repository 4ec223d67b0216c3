"""Climate data for ClimaX: the embedded ERA5 sample, readers (NetCDF, GRIB, zarr, ClimaX npz),
streaming statistics, forecast pairs, every data error, the NetCDF forecast writer."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

xr = pytest.importorskip("xarray", reason="xarray is in the climate/test extras")

from ds4sci.data import climate as C


@pytest.fixture(scope="module")
def sample():
    return C.XarraySource(C.sample_path(), C.SAMPLE_CHANNELS)


def test_embedded_sample_loads(sample):
    assert os.path.getsize(C.sample_path()) < 2_000_000
    assert (len(sample), sample.members, sample.shape) == (4, 10, (61, 120))
    assert sample.lat[0] == 90 and sample.lat[-1] == -90 and sample.lon[1] == 3
    assert np.all(np.diff(sample.times).astype("timedelta64[h]").astype(int) == 12)
    x = sample.read(3, 2)
    assert x.shape == (4, 61, 120) and x.dtype == np.float32
    # plausible January fields: z500 ~ 5.0-5.9e4 m2/s2, T850 ~ 230-300 K
    assert 4.6e4 < x[0].mean() < 5.8e4 and 230 < x[3].mean() < 290
    assert sample.units()["temperature_850"] == "K"
    ds = xr.open_dataset(C.sample_path())
    assert "Copernicus" in ds.attrs["license"]
    np.testing.assert_allclose(x[2], ds["t"].isel(number=3, time=2).sel(isobaricInhPa=500).values, rtol=0, atol=1e-3)


def test_streaming_stats_and_climatology(sample):
    members, times = [0, 4], [1, 3]
    stats = C.normalization_stats(sample, members, times)
    stack = np.stack([sample.read(m, t) for m in members for t in times]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, stack.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats.std, stack.std(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(C.climatology(sample, members, times), stack.mean(axis=0), rtol=1e-12)
    x = torch.from_numpy(stats.normalize(stack[0]))
    torch.testing.assert_close(stats.denormalize(x.double()), torch.from_numpy(stack[0]), rtol=1e-6, atol=1e-3)


def test_forecast_pairs_split_and_collate(sample):
    stats = C.normalization_stats(sample, times=[0])
    splits = C.sample_splits(sample)
    train = C.ForecastDataset(sample, C.SAMPLE_CHANNELS, C.SAMPLE_CHANNELS[:2], stats, 1, patch_size=4,
                              **splits["train"])
    val = C.ForecastDataset(sample, C.SAMPLE_CHANNELS, C.SAMPLE_CHANNELS[:2], stats, 1, patch_size=4, **splits["val"])
    assert len(train) == 20 and len(val) == 10
    assert {t + 1 for _, t in train.pairs}.isdisjoint({t + 1 for _, t in val.pairs})
    item = val[3]
    assert item["x"].shape == (4, 60, 120) and item["y"].shape == (2, 60, 120)
    assert float(item["lead_times"]) == pytest.approx(0.12)  # 12 h / 100, as ClimaX feeds it
    raw = stats.normalize(sample.read(int(item["member"]), int(item["time"]) + 1))
    np.testing.assert_allclose(item["y"].numpy(), raw[:2, :60], rtol=1e-6)
    batch = C.collate([val[0], val[1], val[2]])
    assert batch["x"].shape == (3, 4, 60, 120) and batch["lead_times"].shape == (3,)
    rnd = C.ForecastDataset(sample, C.SAMPLE_CHANNELS, C.SAMPLE_CHANNELS, stats, (1, 3), patch_size=4, seed=5)
    leads = [rnd.lead_steps(i) for i in range(len(rnd))]
    assert leads == [rnd.lead_steps(i) for i in range(len(rnd))] and set(leads) <= {1, 2, 3}
    assert len(rnd) == 10  # only start 0 has every lead 1..3 inside the 4 times
    assert rnd.lat.shape == (60,) and len(rnd.lon) == 120
    padded = C.ForecastDataset(sample, C.SAMPLE_CHANNELS, C.SAMPLE_CHANNELS, stats, 1, patch_size=8, grid_mode="pad")
    assert padded[0]["x"].shape == (4, 64, 120) and padded.lat[-1] == -90 and len(padded.lon) == 120
    with pytest.raises(ValueError, match="no \\(member, start\\) pair"):
        C.ForecastDataset(sample, C.SAMPLE_CHANNELS, C.SAMPLE_CHANNELS, stats, 4)
    with pytest.raises(ValueError, match="not channels"):
        C.ForecastDataset(sample, ["geopotential_500"], ["2m_temperature"], stats)
    with pytest.raises(IndexError):
        val[10]


def test_sample_datasets_for_the_default_run():
    d = C.sample_datasets(patch_size=4)
    assert (len(d["train"]), len(d["val"])) == (20, 10)
    assert d["climatology"].shape == (4, 60, 120) and d["lat"].shape == (60,)
    assert d["units"]["geopotential_500"] == "m**2 s**-2"
    # statistics come from the training times only (0..2), never the validation target (3)
    np.testing.assert_allclose(d["stats"].mean, C.normalization_stats(d["source"], times=[0, 1, 2]).mean)


def _write(path, dims=("time", "level", "lat", "lon"), nan=False, lat=None, calendar=None, var="t", h=4, w=6):
    lat = np.linspace(60, -60, h) if lat is None else lat
    data = np.random.default_rng(0).normal(250, 5, (3, 2, h, w)).astype("float32")
    if nan:
        data[1, 0, 2, 3] = np.nan
    coords = {"time": np.array(["2020-01-01T00", "2020-01-01T06", "2020-01-01T12"], dtype="datetime64[ns]"),
              "level": [850, 500], "lat": lat, "lon": np.arange(w) * 60.0}
    ds = xr.Dataset({var: (("time", "level", "lat", "lon"), data, {"units": "K"})}, coords=coords)
    ds = ds.transpose(*dims)
    encoding = {}
    if calendar:
        encoding["time"] = {"calendar": calendar, "units": "hours since 2000-01-01"}
    ds.to_netcdf(path, engine="scipy", encoding=encoding)
    return str(path)


def test_data_errors_name_file_and_variable(tmp_path):
    good = _write(tmp_path / "good.nc")
    src = C.XarraySource(good, ["temperature_500"])
    assert src.read(0, 2).shape == (1, 4, 6) and src.calendar == "proleptic_gregorian"
    with pytest.raises(FileNotFoundError, match="nope.nc"):
        C.XarraySource(str(tmp_path / "nope.nc"), ["temperature_500"])
    with pytest.raises(ValueError, match=r"good\.nc has no variable for channel 'geopotential_500'"):
        C.XarraySource(good, ["geopotential_500"])
    with pytest.raises(ValueError, match=r"no level 300 for channel 'temperature_300'"):
        C.XarraySource(good, ["temperature_300"])
    with pytest.raises(ValueError, match=r"names none"):
        C.XarraySource(good, ["temperature"])
    wrong = _write(tmp_path / "lonlat.nc", dims=("time", "level", "lon", "lat"))
    with pytest.raises(ValueError, match=r"lonlat\.nc variable 't' has dims .*transpose"):
        C.XarraySource(wrong, ["temperature_500"])
    nan = C.XarraySource(_write(tmp_path / "nan.nc", nan=True), ["temperature_850", "temperature_500"])
    nan.read(0, 0)
    with pytest.raises(ValueError, match=r"nan\.nc variable 't' \(channel 'temperature_850'\) has 1 NaN"):
        nan.read(0, 1)
    other = _write(tmp_path / "later.nc", lat=np.linspace(50, -50, 4))
    with pytest.raises(ValueError, match=r"later\.nc has a 4x6 grid .*grids must match"):
        C.XarraySource([good, other], ["temperature_500"])
    noleap = _write(tmp_path / "noleap.nc", calendar="noleap")
    with pytest.raises(ValueError, match=r"calendar 'noleap'.*calendars must match"):
        C.XarraySource([good, noleap], ["temperature_500"])
    with pytest.raises(ValueError, match="not increasing"):
        C.XarraySource([good, good], ["temperature_500"])
    with pytest.raises(ValueError, match="time step is unknown|evenly"):
        stats = C.Stats(("temperature_500",), np.zeros(1), np.ones(1))
        C.ForecastDataset(C.XarraySource(noleap, ["temperature_500"]), ["temperature_500"], ["temperature_500"], stats)


def test_multi_file_concatenation_and_zarr(tmp_path):
    a = _write(tmp_path / "a.nc")
    ds = xr.open_dataset(a).load()
    ds = ds.assign_coords(time=ds.time + np.timedelta64(18, "h"))
    b = str(tmp_path / "b.nc")
    ds.to_netcdf(b, engine="scipy")
    src = C.XarraySource([b, a], ["temperature_850"])  # sorted by time
    assert len(src) == 6 and np.all(np.diff(src.times) == np.timedelta64(6, "h"))
    np.testing.assert_array_equal(src.read(0, 4)[0], ds["t"].isel(time=1, level=0).values)
    if importlib.util.find_spec("zarr") is None:
        pytest.skip("zarr not installed (pip install ds4sci[climate])")
    z = str(tmp_path / "a.zarr")
    xr.open_dataset(a).to_zarr(z)
    zs = C.XarraySource(z, ["temperature_850"])
    np.testing.assert_array_equal(zs.read(0, 1), C.XarraySource(a, ["temperature_850"]).read(0, 1))


def test_grib_reader(tmp_path):
    if importlib.util.find_spec("cfgrib") is None:
        pytest.skip("cfgrib not installed (pip install ds4sci[climate])")
    eccodes = pytest.importorskip("eccodes")
    path = str(tmp_path / "t.grib")
    with open(path, "wb") as f:
        for day in (1, 2):
            for level in (850, 500):
                h = eccodes.codes_grib_new_from_samples("regular_ll_pl_grib2")
                keys = dict(Ni=12, Nj=7, latitudeOfFirstGridPointInDegrees=90.0, longitudeOfFirstGridPointInDegrees=0.0,
                            latitudeOfLastGridPointInDegrees=-90.0, longitudeOfLastGridPointInDegrees=330.0,
                            iDirectionIncrementInDegrees=30.0, jDirectionIncrementInDegrees=30.0, shortName="t",
                            level=level, dataDate=20170100 + day, dataTime=0)
                for k, v in keys.items():
                    eccodes.codes_set(h, k, v)
                eccodes.codes_set_values(h, 250.0 + day + level / 100 + np.arange(84) / 100)
                eccodes.codes_write(h, f)
                eccodes.codes_release(h)
    src = C.XarraySource(path, ["temperature_500", "temperature_850"])
    assert (len(src), src.shape) == (2, (7, 12))
    np.testing.assert_allclose(src.read(0, 1)[0].reshape(-1), 257.0 + np.arange(84) / 100, atol=1e-3)


def test_npz_shards(tmp_path):
    root = tmp_path / "npz"
    (root / "train").mkdir(parents=True)
    np.save(root / "lat.npy", np.linspace(-60, 60, 4))
    np.save(root / "lon.npy", np.arange(6) * 60.0)
    rng = np.random.default_rng(0)
    shards = [{"2m_temperature": rng.normal(size=(n, 1, 4, 6)).astype("float32"),
               "geopotential_500": rng.normal(size=(n, 1, 4, 6)).astype("float32")} for n in (3, 2)]
    for i, s in enumerate(shards):
        np.savez(root / "train" / f"2015_{i}.npz", **s)
    src = C.open_source(str(root), ["geopotential_500", "2m_temperature"])
    assert isinstance(src, C.NpzSource) and len(src) == 5
    np.testing.assert_array_equal(src.read(0, 4), np.stack([shards[1]["geopotential_500"][1, 0],
                                                            shards[1]["2m_temperature"][1, 0]]))
    np.savez(root / "normalize_mean.npz", geopotential_500=np.array([5.0]), **{"2m_temperature": np.array([280.0])})
    np.savez(root / "normalize_std.npz", geopotential_500=np.array([2.0]), **{"2m_temperature": np.array([10.0])})
    np.savez(root / "train" / "climatology.npz", geopotential_500=np.ones((4, 6)), **{"2m_temperature": np.zeros((4, 6))})
    assert len(C.NpzSource(str(root), ["2m_temperature"])) == 5  # climatology.npz is not a shard
    stats = src.climax_stats()
    assert stats.mean.tolist() == [5.0, 280.0] and stats.std.tolist() == [2.0, 10.0]
    assert src.climax_climatology().shape == (2, 4, 6)
    os.remove(root / "train" / "climatology.npz")
    with pytest.raises(FileNotFoundError, match="climatology.npz"):
        src.climax_climatology()
    with pytest.raises(ValueError, match=r"2015_0\.npz lacks channels \['temperature_850'\]"):
        C.NpzSource(str(root), ["temperature_850"])
    with pytest.raises(FileNotFoundError, match="no .npz shards"):
        C.NpzSource(str(root), ["2m_temperature"], split="val")
    bad = dict(shards[0])
    bad["2m_temperature"] = bad["2m_temperature"][:, :, :3]
    np.savez(root / "train" / "2016_0.npz", **bad)
    with pytest.raises(ValueError, match=r"2016_0\.npz channel '2m_temperature' has shape \(3, 1, 3, 6\)"):
        C.NpzSource(str(root), ["2m_temperature"])
    os.remove(root / "train" / "2016_0.npz")
    shards[0]["2m_temperature"][2, 0, 1, 1] = np.nan
    np.savez(root / "train" / "2015_0.npz", **shards[0])
    with pytest.raises(ValueError, match="NaN"):
        C.NpzSource(str(root), ["2m_temperature"]).read(0, 2)


def test_write_forecast_netcdf(tmp_path):
    f = np.random.default_rng(0).normal(size=(2, 3, 2, 4, 6)).astype("float32")
    init = np.array(["2017-01-01T00", "2017-01-01T12"], dtype="datetime64[ns]")
    path = str(tmp_path / "fc.nc")
    C.write_forecast_netcdf(path, torch.from_numpy(f), ["geopotential_500", "2m_temperature"], np.linspace(60, -60, 4),
                            np.arange(6) * 60.0, init, [12, 24, 36], units={"geopotential_500": "m**2 s**-2"})
    ds = xr.open_dataset(path)
    assert ds["geopotential_500"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    np.testing.assert_array_equal(ds["2m_temperature"].values, f[:, :, 1])
    assert ds["geopotential_500"].attrs["units"] == "m**2 s**-2" and ds["geopotential_500"].attrs["level"] == 500
    assert ds["geopotential_500"].attrs["standard_name"] == "geopotential"
    assert ds.latitude.attrs["units"] == "degrees_north"
    assert ds.valid_time.values[1, 2] == np.datetime64("2017-01-03T00")
    with pytest.raises(ValueError, match="expected \\[T_init, T_lead, C, H, W\\]"):
        C.write_forecast_netcdf(path, f[:, :2], ["a", "b"], np.zeros(4), np.zeros(6), init, [12, 24, 36])
