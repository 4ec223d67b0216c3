"""GenSLM codon language models as a training task: FASTA corpora tokenised into memory-mapped
token files, next-token cross-entropy (summed over predicted tokens), validation perplexity,
and the GPT-NeoX model with its SP/TP/FSDP/PP plans (``models.genslm.parallelize``).

Also the loading of trained models for ``ds4sci embed`` / ``generate`` (:func:`load_model`):
run directories, checkpoints and saved HF GPT-NeoX directories.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...data.corpus import default_records
from ...data.dataset import TokenDataset, build_token_dir, collate
from ...data.fasta import read_fasta
from ...data.tokenizer import CodonTokenizer
from ...models.genslm import GenSLM, GenSLMConfig, init_parameters, load_parameters
from ...models.genslm.config import preset
from ...models.genslm.model import IGNORE_INDEX
from ..task import Task, _num


@dataclass
class DataConfig:
    fasta: list[str] = field(default_factory=list)
    """FASTA / FASTA.gz files to train on; empty = the embedded SARS-CoV-2 corpus."""
    n_simulated: int = 47
    """Embedded corpus only: simulated variant genomes added to the reference."""
    simulate_seed: int = 0
    """Embedded corpus only: seed of the variant simulator."""
    val_fraction: float = 0.1
    """Fraction of records (every 1/val_fraction-th) held out for validation."""
    frame: int = 0
    """Reading frame offset (0, 1 or 2 nucleotides skipped)."""
    vocab: str = "genslm-69"
    """Tokenizer vocabulary: genslm-69, genslm-71 or an HF tokenizers JSON path."""
    max_tokens: int | None = None
    """Crop each record to this many tokens; None = whole records (whole genomes)."""
    on_bad: str = "skip"
    """Bad FASTA records: skip (warn with their name) or error."""

    def __post_init__(self):
        if self.on_bad not in ("skip", "error"):
            raise ValueError(f"data.on_bad={self.on_bad!r}; expected 'skip' or 'error'")
        if self.frame not in (0, 1, 2):
            raise ValueError(f"data.frame={self.frame}; expected 0, 1 or 2")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ValueError(f"data.val_fraction={self.val_fraction}; expected in [0, 0.5]")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"data.max_tokens={self.max_tokens}; expected >= 2 or null")
        if self.n_simulated < 0:
            raise ValueError(f"data.n_simulated={self.n_simulated}; expected >= 0")



def _records(cfg):
    if not cfg.data.fasta:
        yield from default_records(cfg.data.n_simulated, cfg.data.simulate_seed)
        return
    for path in cfg.data.fasta:
        for rec in read_fasta(path, on_bad=cfg.data.on_bad):
            yield rec.name, rec.sequence


def _file_fingerprint(path: str, known: dict | None) -> dict:
    """Size, mtime and sha256 of an input file; the sha256 is reused from ``known`` when size and
    mtime are unchanged (no re-read of a large corpus at every start)."""
    stat = Path(path).stat()
    entry = {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and known.get("bytes") == entry["bytes"] and known.get("mtime_ns") == entry["mtime_ns"]:
        entry["sha256"] = known["sha256"]
    else:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        entry["sha256"] = digest.hexdigest()
    return entry


def _inputs_fingerprint(cfg, known: list | None) -> list:
    """What the token cache was built from: each FASTA file's fingerprint, or for the embedded
    corpus a hash of the records themselves (reference genome and simulated variants)."""
    if not cfg.data.fasta:
        digest = hashlib.sha256()
        for name, seq in _records(cfg):
            digest.update(f"{name}\n{seq}\n".encode())
        return [{"embedded": digest.hexdigest()}]
    known_by_path = {k.get("path"): k for k in known or []}
    return [_file_fingerprint(p, known_by_path.get(str(Path(p).resolve()))) for p in cfg.data.fasta]


def prepare_data(cfg, tokenizer: CodonTokenizer, resume: bool = False) -> Path:
    """Token files for this data config in ``out_dir/data``, keyed on the config *and* the inputs'
    contents: rebuilt when either changed (a FASTA edited in place, too). On ``resume`` a change
    of contents is refused (the run would continue on other data), and inputs that have moved
    away are not needed: the cached tokens are used."""
    token_dir = Path(cfg.out_dir) / "data"
    config = {k: v for k, v in cfg.to_dict()["data"].items() if k != "max_tokens"}
    stamp_file = token_dir / "config.json"
    stamp = None
    if stamp_file.is_file():
        try:
            stamp = json.loads(stamp_file.read_text())
        except ValueError:
            stamp = None
        if isinstance(stamp, dict) and "inputs" not in stamp:  # written before inputs were stamped
            stamp = {"config": stamp, "inputs": None}
    cached = isinstance(stamp, dict) and stamp.get("config") == config
    missing = [p for p in cfg.data.fasta if not Path(p).is_file()]
    if resume and cached and missing:
        print(f"data: {', '.join(missing)} not found; resuming from the tokens cached in {token_dir}",
              file=sys.stderr)
        return token_dir
    for p in missing:
        what = "is a directory" if Path(p).is_dir() else "does not exist"
        raise FileNotFoundError(f"data.fasta: {p!r} {what}; expected a FASTA or FASTA.gz file")
    inputs = _inputs_fingerprint(cfg, stamp.get("inputs") if cached else None)
    if cached and stamp["inputs"] is None:  # an older run's cache: adopt it, stamped from now on
        stamp_file.write_text(json.dumps({"config": config, "inputs": inputs}))
        return token_dir
    def contents(entries):  # the modification time alone (touch, cp, checkout) changes nothing
        return [{k: v for k, v in e.items() if k != "mtime_ns"} for e in entries]

    if cached and contents(stamp["inputs"]) == contents(inputs):
        if stamp["inputs"] != inputs:  # re-stamp the new times: no re-hash next start
            stamp_file.write_text(json.dumps({"config": config, "inputs": inputs}))
        return token_dir
    if cached:
        changed = [i.get("path", "embedded corpus") for i, j in zip(contents(inputs), contents(stamp["inputs"]))
                   if i != j]
        if resume:
            raise ValueError(f"data: {', '.join(changed) or 'the inputs'} changed since this run tokenised "
                             f"them (contents differ); --resume would continue on other data. Restore the "
                             f"input, or start a new run (another --out_dir, or --overwrite=true)")
        print(f"data: {', '.join(changed) or 'the inputs'} changed since the tokens in {token_dir} were "
              "built; tokenising again", file=sys.stderr)
    stamp_file.unlink(missing_ok=True)  # a build that dies half-way is redone next time
    try:
        build_token_dir(_records(cfg), tokenizer, token_dir, cfg.data.val_fraction, cfg.data.frame)
    except OSError as err:  # disk full, quota, read-only: no half-written token files left
        for tmp in token_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(token_dir).free if token_dir.exists() else 0
        raise ValueError(f"data: could not write the token files in {token_dir}: {err.strerror or err} "
                         f"({free / 2**20:.1f} MiB free; they need about 1 byte per codon)") from None
    stamp_file.write_text(json.dumps({"config": config, "inputs": inputs}))
    return token_dir


class GenSLMTask(Task):
    name = "genslm"
    description = "GenSLM codon language model (GPT-NeoX) on FASTA genomes; default: embedded SARS-CoV-2 corpus"
    data_config = DataConfig
    model_config = GenSLMConfig
    default_model = "genslm-tiny"
    # 200 steps: at 80 the embeddings separated the simulated lineages slightly worse than codon
    # frequencies (1-NN 0.87 vs 0.89); at 200, slightly better (0.93 vs 0.89). A few minutes on
    # two CPU cores.
    defaults = {"optim.max_steps": 200, "eval_every": 50, "checkpoint_every": 50}
    count_name = "tokens"

    def preset(self, name: str) -> GenSLMConfig:
        return preset(name)

    def config_from_dict(self, data: dict) -> GenSLMConfig:
        return GenSLMConfig.from_dict(dict(data))

    def check(self, cfg, model_config) -> None:
        tokenizer = CodonTokenizer(cfg.data.vocab)
        if model_config.vocab_size < len(tokenizer):
            raise ValueError(f"data.vocab={cfg.data.vocab!r} has {len(tokenizer)} tokens but model.vocab_size="
                             f"{model_config.vocab_size}; add --model.vocab_size={len(tokenizer)}")

    # ----- data -----
    def prepare_data(self, cfg, out_dir: Path, resume: bool = False) -> None:
        prepare_data(cfg, CodonTokenizer(cfg.data.vocab), resume=resume)

    def datasets(self, cfg, out_dir: Path):
        self.pad_id = CodonTokenizer(cfg.data.vocab).pad_id
        token_dir = Path(out_dir) / "data"
        return (TokenDataset(token_dir, "train", cfg.data.max_tokens),
                TokenDataset(token_dir, "val", cfg.data.max_tokens))

    def collate(self, records: list) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(records, self.pad_id)

    def count(self, records: list) -> int:
        return sum(len(r) - 1 for r in records)  # a record of n tokens predicts n - 1

    def describe_data(self, cfg, train, val) -> str:
        return (f"{len(train)} train / {len(val)} val records, {int(train.offsets[-1]):,} train tokens")

    def data_label(self, cfg) -> str:
        return "embedded SARS-CoV-2 corpus" if not cfg.data.fasta else ", ".join(cfg.data.fasta)

    # ----- model -----
    def build_model(self, model_config, seed: int | None = None) -> GenSLM:
        return GenSLM(model_config, seed=seed)

    def init_parameters(self, module, seed: int) -> None:
        init_parameters(module, seed)

    def load_parameters(self, module, weights) -> None:
        load_parameters(module, weights)

    def loss_sum(self, model, batch):
        """What ``GenSLM.forward(ids, labels=labels)`` computes, as (sum, count)."""
        ids, labels = batch
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        # With loss chunks the final norm runs inside each (recomputed) chunk.
        normed = model.config.loss_chunk_size is None
        hidden = model.hidden_states(ids, final_norm=normed)
        loss_sum, count, _ = model.loss_sum(hidden, targets, normed=normed)
        return loss_sum, count

    # ----- distributed -----
    def make_dims(self, parallel, world_size, model_config):
        from ...models.genslm.parallelize import make_dims

        return make_dims(parallel, world_size, model_config)

    def check_layout(self, dims, model_config) -> None:
        from ...models.genslm.parallelize import check_layout

        check_layout(dims, model_config)

    def parallelize(self, model, dims, mesh, parallel, fsdp: dict) -> None:
        from ...models.genslm.parallelize import parallelize_genslm

        parallelize_genslm(model, dims, mesh, ring_layout=parallel.sp_layout,
                           tp_embeddings=parallel.tp_embeddings, **fsdp)

    def pipeline(self, model, dims, mesh, parallel, fsdp: dict, *, batch_size: int, seq_len: int, device):
        from ...models.genslm.parallelize import pipeline_genslm

        return pipeline_genslm(model, dims, mesh, batch_size=batch_size, seq_len=seq_len,
                               n_microbatches=parallel.pp_microbatches, schedule=parallel.pp_schedule,
                               device=device, tp_embeddings=parallel.tp_embeddings, **fsdp)

    def pipeline_length(self, records: list) -> int:
        return max(len(r) for r in records)

    def sharded_loss_sum(self, model, batch, dims, mesh, parallel):
        ids, labels = batch
        if dims.sp_enabled:
            from ...models.genslm.parallelize import shard_batch
            from ...parallel.sequence import sequence_layout

            layout, ulysses = sequence_layout(dims, parallel.sp_layout)
            ids, targets, positions = shard_batch(ids, labels, mesh.sp_rank, dims.sp, layout, ulysses,
                                                  pad_id=self.pad_id)
        else:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
            positions = None
        # The final norm runs inside the loss chunks (never a whole normed [S, E] copy).
        hidden = model.hidden_states(ids, positions=positions, final_norm=False)
        loss_sum, count, _ = model.loss_sum(hidden, targets, normed=False)
        return loss_sum, count

    # ----- evaluation -----
    def eval_metrics(self, loss_sum: float, count: float) -> dict:
        """Validation perplexity: exp of the mean next-token loss over every validation token."""
        if not count:
            return {"val_perplexity": None}
        mean = loss_sum / count
        return {"val_perplexity": math.exp(mean) if mean < 700 else math.inf}

    def plot(self, rows: list[dict], path: Path, title: str) -> None:
        from ..metrics import plot_metrics

        plot_metrics(rows, path, title=title)  # cross-entropy in nats/token, perplexity as its log

    def summary(self, rows: list[dict]) -> str:
        first, last = rows[0], rows[-1]
        val = last.get("val_perplexity")
        return (f"loss {_num(first['loss'], '.3f')} -> {_num(last['loss'], '.3f')} nats/token over {last['step']} steps; "
                f"validation perplexity {float('nan') if val is None else val:.2f}; "
                f"{last['tokens_per_s']:.0f} tokens/s; peak memory {last['peak_memory_bytes'] / 2**30:.2f} GiB")

    run_files = frozenset({"lineages.json", "lineages.png"})

    def after_fit(self, trainer) -> dict:
        """On the embedded corpus: how well the trained model's genome embeddings separate the
        simulated lineages, against codon frequencies (``train.lineages``)."""
        cfg = trainer.cfg
        if cfg.data.fasta or not trainer.is_main or hasattr(trainer, "dims"):
            return {}  # lineages are known for the simulated corpus; one process holds the model
        from ..lineages import evaluate_lineages, simulated_lineages

        tokenizer = CodonTokenizer(cfg.data.vocab)
        meta_names = trainer.train_data.meta["names"]
        result = evaluate_lineages(trainer.model, (trainer.train_data, trainer.val_data),
                                   (meta_names["train"], meta_names["val"]),
                                   simulated_lineages(cfg.data.n_simulated, cfg.data.simulate_seed),
                                   sorted(tokenizer.codon_ids.values()), trainer.out)
        e, c = result["embedding"], result["codon_frequency"]
        print(f"lineages ({result['genomes']} genomes, {len(result['lineages'])} simulated lineages, majority "
              f"class {result['majority_class_rate']:.2f}): 1-NN accuracy {e['knn1_accuracy']:.2f} (embeddings) "
              f"vs {c['knn1_accuracy']:.2f} (codon frequencies); silhouette {e['silhouette']:.2f} vs "
              f"{c['silhouette']:.2f}; {trainer.out / 'lineages.png'}")
        return result

    # ----- init_from -----
    def load_weights(self, path: str):
        weights, config, vocab = load_weights(path)
        return weights, config, vocab

    def check_init_from(self, path: str, theirs_config, vocab, cfg, model_config) -> None:
        changes = theirs_config.architecture_changes(model_config)
        if changes:
            raise ValueError(f"init_from={path!r}: its model differs from this run's in {changes} (theirs, "
                             f"ours); choose the matching preset (model=...) or --model.<field>=... overrides")
        theirs = CodonTokenizer(vocab or "genslm-69")  # HF (GenSLM) models: GenSLM's 69 tokens
        if theirs.vocab != CodonTokenizer(cfg.data.vocab).vocab:
            raise ValueError(f"init_from={path!r} was trained with the tokenizer {vocab or 'genslm-69'!r}, "
                             f"this run uses data.vocab={cfg.data.vocab!r}, which maps tokens to other "
                             f"ids: the embeddings would mean other codons")


def load_weights(path: str | Path) -> tuple[Mapping[str, torch.Tensor], GenSLMConfig, str | None]:
    """``(weights, config, vocab)`` of a run directory (its latest checkpoint), a checkpoint
    directory, or a saved HF GPT-NeoX directory. ``weights``: the whole model's tensors under our
    names, each read from storage when asked for (see ``parallel.init.load_parameters``);
    ``vocab``: the tokenizer the run trained with (``data.vocab``), None for HF models (GenSLM's
    69 tokens)."""
    from ..checkpoint import checkpoint_weights, latest_checkpoint

    path = Path(path)
    if (path / "config.json").is_file():
        from ...models.genslm.interop import hf_weights

        weights, config = hf_weights(path)
        vocab = None
    else:
        ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no checkpoint found")
        weights, state = checkpoint_weights(ckpt)
        config = GenSLMConfig.from_dict(dict(state["config"]["model_config"]))
        train = state["config"]["train"]
        if train.get("task", "genslm") != "genslm":
            raise ValueError(f"{path}: a checkpoint of task {train['task']!r}, not a GenSLM")
        vocab = train["data"]["vocab"]
    with torch.device("meta"):  # the names the config's model has (no storage)
        expected = {name for name, _ in GenSLM(config).named_parameters()}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: its weights do not fit its own model config: {len(missing)} missing "
                         f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    return weights, config, vocab


def load_model(path: str | Path) -> tuple[GenSLM, CodonTokenizer]:
    """A model (fp32) from a run directory (its latest checkpoint), a checkpoint directory, or a
    saved HF GPT-NeoX directory; with the tokenizer it was trained with (GenSLM's 69 otherwise)."""
    weights, config, vocab = load_weights(path)
    with torch.device("meta"):
        model = GenSLM(config)
    load_parameters(model.to_empty(device="cpu"), weights)
    return model.eval(), CodonTokenizer(vocab) if vocab is not None else CodonTokenizer()
