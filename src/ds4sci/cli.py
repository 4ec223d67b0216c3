"""The ``ds4sci`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def info() -> int:
    from . import __version__
    from .ops.evoformer_attention import dispatch

    print(f"ds4sci {__version__}")
    print(f"python {platform.python_version()} · torch {torch.__version__} · {platform.platform()}")
    print(f"cpu: {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: not available")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print("\nops")
    print("  evoformer_attention")
    probe = torch.empty(1, 1, 1, 1)  # a CPU float32 call, for the per-device reasons
    for backend in dispatch.backends():
        reasons = backend.not_supported_reasons(probe, [])
        state = "available" if not reasons else "not available here: " + "; ".join(reasons)
        auto = "" if backend.priority >= 0 else " (explicit only)"
        print(f"    {backend.name:<10} {state}{auto}")
        if backend.description:
            print(f"    {'':<10} {backend.description}")
    print(f"    auto on cpu/float32 -> {dispatch.select('auto', probe, []).name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ds4sci", description="DeepSpeed4Science technologies on plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which op backends run here")
    sub.add_parser("demo", help="Evoformer attention demo: exactness and memory vs naive PyTorch")
    bench = sub.add_parser("bench", help="run a benchmark (see benchmarks/)")
    bench.add_argument("name", choices=["evoformer-attention"])
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return info()
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    from .bench import evoformer_attention

    return evoformer_attention.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
