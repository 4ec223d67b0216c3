"""The ``ds4sci`` command: ``train``, ``embed``, ``generate``, ``forecast``, ``md``, ``sample``,
``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

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


_LAYOUT_FLAGS = ("dp", "sp", "tp", "pp", "sp_mode", "sp_ulysses")


def train(args, overrides: list[str]) -> int:
    from .train.config import load_config
    from .train.distributed import DistributedTrainer, launched_distributed
    from .train.trainer import Trainer

    # --dp/--sp/... are shorthands for parallel.* keys (a YAML file may set those too).
    layout = [f"parallel.{name}={getattr(args, name)}" for name in _LAYOUT_FLAGS
              if getattr(args, name) is not None]
    cfg = load_config(args.config, [*overrides, *layout], task=args.task)
    task = cfg.task_spec
    distributed = launched_distributed()
    p = cfg.parallel
    n = max(p.dp, 1) * p.sp * p.tp * p.pp  # processes the layout needs (dp=-1: at least 1)
    if not distributed and n > 1:
        raise ValueError(f"the layout dp={p.dp} sp={p.sp} tp={p.tp} pp={p.pp} needs {n} processes; "
                         f"launch with torchrun --nproc-per-node={n} -m ds4sci.cli train {task.name} ...")
    if distributed:
        trainer = DistributedTrainer(cfg, resume=args.resume, config_path=args.config)
        main_rank, layout_note = trainer.is_main, f", layout {trainer.dims.describe()} on {trainer.world_size} ranks"
    else:
        trainer = Trainer(cfg, resume=args.resume, config_path=args.config)
        main_rank, layout_note = True, ""
    if main_rank:
        print(f"ds4sci train {task.name}: {cfg.model} ({trainer.num_parameters / 1e6:.2f} M parameters), "
              f"{task.describe_data(cfg, trainer.train_data, trainer.val_data)}, precision {cfg.precision}"
              + layout_note + (f", resuming at step {trainer.step}" if args.resume else ""), flush=True)
    result = trainer.fit()
    rows = result["rows"]
    if rows and main_rank:
        print(task.summary(rows) + (" (largest rank)" if distributed else ""))
        task.after_fit(trainer)
    if main_rank:
        extra = sorted(f for f in task.run_files if (Path(cfg.out_dir) / f).exists())
        print(f"run directory {cfg.out_dir}: metrics.jsonl, loss_curve.png, checkpoints/"
              + "".join(f", {f}" for f in extra))
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def embed(args) -> int:
    import numpy as np

    from .data.fasta import read_fasta
    from .models.genslm.inference import embed as embed_sequences
    from .train.tasks.genslm import load_model

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens}; expected >= 1 (or leave it out for whole sequences)")
    out = Path(args.out)
    _check_output_file("--out", out)
    model, tokenizer = load_model(args.model)
    records = list(read_fasta(args.fasta, on_bad="error"))
    vectors = embed_sequences(model, tokenizer, [r.sequence for r in records], args.max_tokens)
    # Through a file object: np.save(path) would append ".npy" to a name without it, and the
    # path printed would not be the file written.
    with out.open("wb") as f:
        np.save(f, vectors)
    names = out.with_suffix(".names.txt")
    names.write_text("".join(r.name + "\n" for r in records))
    print(f"embedded {len(records)} records -> {out} {tuple(vectors.shape)} (names in {names})")
    return 0


def _check_output_file(flag: str, path: Path) -> None:
    """Before any work: the output must be a file path in an existing directory."""
    if path.is_dir():
        raise ValueError(f"{flag}={path} is a directory; expected a file path to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag}={path}: directory {path.parent} does not exist")


def generate(args) -> int:
    import math

    from .models.genslm.inference import generate_batch
    from .train.tasks.genslm import load_model

    # Checked before the model is loaded: a usage error should not cost a load.
    if args.num < 1:
        raise ValueError(f"--num={args.num}; expected >= 1 sequences")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}; expected >= 0")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature={args.temperature}; expected a finite number > 0")
    out = Path(args.out)
    _check_output_file("--out", out)
    model, tokenizer = load_model(args.model)
    # All sequences in one batch with the KV cache; sequence i samples with seed + i.
    seeds = [args.seed + i for i in range(args.num)]
    seqs = generate_batch(model, tokenizer, [args.prompt] * args.num, args.max_new_tokens, top_k=args.top_k,
                          top_p=args.top_p, temperature=args.temperature, seeds=seeds)
    lines = []
    for i, seq in enumerate(seqs):
        lines.append(f">generated_{i} prompt={args.prompt} seed={seeds[i]}\n")
        lines += [seq[j : j + 70] + "\n" for j in range(0, len(seq), 70)]
    out.write_text("".join(lines))
    print(f"wrote {args.num} sequences to {out}")
    return 0


BENCHMARKS = {
    "climax-memory": "climax_memory",
    "dig": "dig",
    "dig-quality": "dig_quality",
    "evoformer-attention": "evoformer_attention",
    "evoformer-block": "evoformer_block",
    "genslm-generate": "genslm_generate",
    "genslm-init": "genslm_init",
    "genslm-memory": "genslm_memory",
    "md": "md",
    "parallel-scaling": "parallel",
}
"""``ds4sci bench NAME`` -> module in ``ds4sci.bench`` (its ``main(argv)`` takes the rest)."""


def _config_keys(task_name: str) -> str:
    """The training config's keys for ``--key=value``: fields, ``<section>.<field>`` and the
    task's ``data.*`` and ``model.*`` keys."""
    import dataclasses

    from .train.config import TrainConfig
    from .train.task import get_task

    task = get_task(task_name)
    keys = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model_changes", "task"):
            continue
        if f.name == "data":
            keys += [f"data.{d.name}" for d in dataclasses.fields(task.data_config)]
            continue
        section = dataclasses.is_dataclass(f.default_factory()) if callable(f.default_factory) else False
        keys.append(f"{f.name}.<field>" if section else f.name)
        if f.name == "model":
            keys.append(f"model.<field of {task.model_config.__name__}>")
    return ", ".join(keys)


class _TaskHelp(argparse.Action):
    """``ds4sci train <task> --help``: the task's own config keys."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .train.task import get_task

        if namespace.task is not None:
            task = get_task(namespace.task)
            parser.description = (f"{task.description}. Config keys (--key=value, or a YAML file): "
                                  f"{_config_keys(task.name)} (see ds4sci.train.config).")
        parser.print_help()
        parser.exit()


def _option(argv: list[str], name: str) -> tuple[int, str] | None:
    """``(index, value)`` of ``--name VALUE`` or ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return i, argv[i + 1]
        if arg.startswith(name + "="):
            return i, arg.split("=", 1)[1]
    return None


def _replace_option(argv: list[str], name: str, new_name: str, value: str) -> list[str]:
    i, _ = _option(argv, name)
    argv = list(argv)
    if argv[i] == name:
        argv[i:i + 2] = [new_name, value]
    else:
        argv[i] = f"{new_name}={value}"
    return argv


def md(rest: list[str]) -> int:
    """``ds4sci md run ...``: a trained ``ds4sci train forcefield`` run directory given as
    ``--model`` is exported to ``RUN/model.pt`` (absolute energies) first."""
    from .md.cli import main as md_main

    found = _option(rest, "--model")
    if found is not None and Path(found[1]).is_dir():
        from .md.potential import save_model
        from .train.tasks.forcefield import load_model

        exported = Path(found[1]) / "model.pt"
        save_model(exported, load_model(found[1]))
        rest = _replace_option(rest, "--model", "--model", str(exported))
    return md_main(rest)


def sample(rest: list[str]) -> int:
    """``ds4sci sample --model RUN ...``: conformations from a trained DiG (``models.dig.sample``;
    ``--model`` is a ``ds4sci train dig`` run or checkpoint directory, or a DiG .pt file)."""
    from .models.dig.sample import main as sample_main

    found = _option(rest, "--model")
    if found is not None:
        from .models.dig.sample import save_checkpoint
        from .train.tasks.dig import load_model

        path = Path(found[1])
        if path.is_dir():
            exported = path / "dig_model.pt"
            save_checkpoint(load_model(path), exported)
            path = exported
        rest = _replace_option(rest, "--model", "--checkpoint", str(path))
    return sample_main(rest)


def forecast(args) -> int:
    from .train.tasks.climax_eval import forecast as climax_forecast

    path = climax_forecast(args.model, args.steps, args.out, num_inits=args.inits)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ds4sci", description="DeepSpeed4Science technologies on plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    from .train.task import task_names

    tr = sub.add_parser("train", help=f"train a model ({', '.join(task_names())}); extra --key=value "
                        "override the config", add_help=False,
                        description="`ds4sci train TASK --help` lists that task's config keys.")
    tr.add_argument("-h", "--help", action=_TaskHelp, nargs=0, help="show this help (with TASK: its config keys)")
    tr.add_argument("task", nargs="?", choices=task_names(), help="what to train")
    tr.add_argument("--config", help="YAML config file")
    tr.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    par = tr.add_argument_group("parallel layout (launch with torchrun; dp x sp x tp x pp = processes)")
    par.add_argument("--dp", type=int, help="data-parallel degree, FSDP over dp x sp (default: inferred)")
    par.add_argument("--sp", type=int, help="sequence-parallel degree")
    par.add_argument("--tp", type=int, help="tensor-parallel degree")
    par.add_argument("--pp", type=int, help="pipeline-parallel degree")
    par.add_argument("--sp-mode", dest="sp_mode", choices=["ulysses", "ring", "hybrid"],
                     help="sequence-parallel attention (default ulysses)")
    par.add_argument("--sp-ulysses", dest="sp_ulysses", type=int,
                     help="Ulysses degree inside --sp-mode=hybrid (the rest is the ring)")
    em = sub.add_parser("embed", help="mean-pooled last hidden state per FASTA record -> .npy")
    em.add_argument("--model", required=True, help="run dir, checkpoint dir or HF GPT-NeoX dir")
    em.add_argument("--fasta", required=True)
    em.add_argument("--out", required=True, help="output .npy (names go beside it)")
    em.add_argument("--max-tokens", type=int, default=None)
    ge = sub.add_parser("generate", help="sample sequences from a prompt -> FASTA")
    ge.add_argument("--model", required=True, help="run dir, checkpoint dir or HF GPT-NeoX dir")
    ge.add_argument("--prompt", default="ATG")
    ge.add_argument("--num", type=int, default=1)
    ge.add_argument("--max-new-tokens", type=int, default=100)
    ge.add_argument("--top-k", type=int, default=50)
    ge.add_argument("--top-p", type=float, default=0.95)
    ge.add_argument("--temperature", type=float, default=1.0)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--out", default="generated.fasta")
    fc = sub.add_parser("forecast", help="roll a trained ClimaX run out to a lead time -> NetCDF")
    fc.add_argument("--model", required=True, help="a ds4sci train climax run or checkpoint directory")
    fc.add_argument("--steps", type=int, default=2, help="autoregressive steps of the run's lead time")
    fc.add_argument("--inits", type=int, default=1, help="validation initial states to forecast from")
    fc.add_argument("--out", default="forecast.nc", help="output NetCDF file")
    sub.add_parser("md", help="molecular dynamics with a force field (md run --help)", add_help=False)
    sub.add_parser("sample", help="sample conformations from a trained DiG (sample --help)", add_help=False)
    sub.add_parser("info", help="versions, devices and which op backends run here")
    sub.add_parser("demo", help="Evoformer attention demo: exactness and memory vs naive PyTorch")
    # No -h of its own: `ds4sci bench NAME --help` reaches the benchmark's parser (its options).
    bench = sub.add_parser("bench", help="run a benchmark (see benchmarks/); NAME --help for its options",
                           add_help=False)
    bench.add_argument("name", nargs="?", choices=sorted(BENCHMARKS))
    if argv and argv[0] in ("md", "sample"):  # their own parsers take the rest
        try:
            return md(argv[1:]) if argv[0] == "md" else sample(argv[1:])
        except (ValueError, FileNotFoundError) as err:
            print(f"ds4sci {argv[0]}: error: {err}", file=sys.stderr)
            return 2
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("bench", "train") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "train" and args.task is None:
        tr.error(f"the task is required: ds4sci train TASK, TASK one of {', '.join(task_names())}")
    if args.command in ("train", "embed", "generate", "forecast"):
        from .train.checkpoint import CheckpointError
        from .train.run_dir import EXIT_STOPPED, RunStopped
        from .train.trainer import NonFiniteError

        try:
            if args.command == "train":
                from .train.distributed import launched_distributed

                if launched_distributed():
                    # record: a rank's traceback goes into torchrun's failure summary.
                    from torch.distributed.elastic.multiprocessing.errors import record

                    return record(train)(args, rest)
                return train(args, rest)
            if args.command == "forecast":
                return forecast(args)
            return embed(args) if args.command == "embed" else generate(args)
        except RunStopped as stopped:
            print(f"ds4sci {args.command}: {stopped}", file=sys.stderr)
            return EXIT_STOPPED
        except NonFiniteError as err:  # the run diverged: not a usage error
            print(f"ds4sci {args.command}: error: {err}", file=sys.stderr)
            return 1
        except (ValueError, TypeError, FileNotFoundError, CheckpointError) as err:
            print(f"ds4sci {args.command}: error: {err}", file=sys.stderr)
            return 2
    if args.command == "info":
        return info()
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    if args.name is None:
        bench.print_help()
        return 0 if rest in ([], ["-h"], ["--help"]) else 2
    import importlib

    return importlib.import_module(f"ds4sci.bench.{BENCHMARKS[args.name]}").main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
