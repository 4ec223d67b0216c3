"""Run the Triton backend's tests under each Triton version, each in its own environment.

torch releases pin triton exactly (torch 2.6 pins 3.2; each later release a later one), so GPU
users often run older tritons than the newest. For each version this makes a venv
(``--system-site-packages``: the installed torch, numpy, pytest and hypothesis are reused; the
venv's own ``triton==X`` comes first on ``sys.path`` and shadows the system one, which is
checked before the tests run), then runs ``pytest tests/test_evoformer_attention_triton.py``
with this checkout's ``src`` on ``PYTHONPATH``: the CPU cases in Triton's interpreter (the suite
sets ``TRITON_INTERPRET=1`` per test) and the offline compilation of every kernel for sm_90.
Writes ``benchmarks/results/triton_matrix.{json,md}`` (version, passed/failed/skipped, time,
date, commit, machine).

Usage: ``python benchmarks/triton_matrix.py [--versions 3.2.0 3.6.0 ...] [--venvs DIR]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["3.2.0", "3.3.1", "3.4.0", "3.5.1", "3.6.0", "3.7.1", "3.8.0", "3.9.0"]
TESTS = "tests/test_evoformer_attention_triton.py"


def _venv(root: Path, version: str) -> Path:
    venv = root / f"triton-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # --ignore-installed: the system's triton may already be this version; it must be the venv's.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--ignore-installed", "--no-deps",
                    f"triton=={version}"], check=True)
    seen = subprocess.run([str(python), "-c", "import triton; print(triton.__version__, triton.__file__)"],
                          capture_output=True, text=True, check=True).stdout.split()
    if seen[0] != version or not seen[1].startswith(str(venv)):
        raise RuntimeError(f"venv {venv} imports triton {seen[0]} from {seen[1]}; expected {version} from the venv")
    return python


def run_version(python: Path, version: str, timeout: float) -> dict:
    junit = ROOT / f".triton_matrix_{version}.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)  # the suite sets it per test, as in CI
    # A fresh kernel cache: a cached cubin would hide a kernel that no longer compiles.
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"ds4sci-triton-{version}-cache-")
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                               TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"triton": version, "status": "timeout", "seconds": round(time.perf_counter() - start)}
    row = {"triton": version, "seconds": round(time.perf_counter() - start), "exit_code": proc.returncode}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        row.update(passed=total - failures - errors - skipped, failed=failures + errors, skipped=skipped)
        row["failed_tests"] = [f"{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:160]}"
                               for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None][:10]
        junit.unlink()
    row["status"] = "ok" if proc.returncode == 0 else "failed"
    row["tail"] = proc.stdout.strip().splitlines()[-1:] if proc.stdout else proc.stderr.strip().splitlines()[-3:]
    return row


def _write(rows, meta, out: Path) -> None:
    """Results of this run, with those of earlier runs for other versions kept (by version)."""
    out.mkdir(parents=True, exist_ok=True)
    old = out / "triton_matrix.json"
    if old.is_file():
        mine = {r["triton"] for r in rows}
        earlier = json.loads(old.read_text())
        kept = [{"run_date": earlier["machine"]["date"], "run_commit": earlier["machine"]["git_commit"], **r}
                for r in earlier["results"] if r["triton"] not in mine]
        rows = sorted(kept + [{"run_date": meta["date"], "run_commit": meta["git_commit"], **r} for r in rows],
                      key=lambda r: tuple(int(x) for x in r["triton"].split(".")))
    (out / "triton_matrix.json").write_text(json.dumps({"machine": meta, "results": rows}, indent=2) + "\n")
    lines = [f"`{TESTS}` per triton version: torch {meta['torch']}, numpy {meta['numpy']}, python {meta['python']}, "
             f"{'CUDA' if meta['cuda'] else 'no GPU (CPU cases in the interpreter + offline sm_90 compilation)'}, "
             f"{meta['date'][:10]}, commit {meta['git_commit']}.", "",
             "| triton | passed | failed | skipped | time (s) | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['triton']} | {r.get('passed', '-')} | {r.get('failed', '-')} | {r.get('skipped', '-')} | "
                     f"{r.get('seconds', '-')} | {r['status']} |")
    (out / "triton_matrix.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", nargs="+", default=VERSIONS)
    parser.add_argument("--venvs", type=Path, default=Path("/tmp/ds4sci-triton-matrix"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per version")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import numpy
    import torch

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available(), "tests": TESTS}
    rows = []
    for version in args.versions:
        try:
            row = run_version(_venv(args.venvs, version), version, args.timeout)
        except (subprocess.CalledProcessError, RuntimeError) as err:
            row = {"triton": version, "status": "install failed", "error": str(err)[-300:]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "failed_tests"}), flush=True)
        _write(rows, meta, args.out)  # after each version: a long matrix keeps what it has done
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
