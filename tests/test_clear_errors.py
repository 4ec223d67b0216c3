"""One clear error instead of a traceback or a misleading message, outside the trainer: FASTA
files, Evoformer attention and modules, checkpoints, and ``ds4sci embed`` / ``generate``."""

import gzip
import json

import numpy as np
import pytest
import torch

from ds4sci.cli import main
from ds4sci.data.fasta import FastaRecordError, read_fasta
from ds4sci.ops.evoformer_attention import evoformer_attention, evoformer_attention_reference


# ----- FASTA -----
def _gz(tmp_path, records=200):
    data = gzip.compress(("".join(f">r{i}\nATGAAACCCGGG\n" for i in range(records))).encode())
    return data


def test_truncated_gzip_fasta_names_the_file(tmp_path):
    path = tmp_path / "cut.fa.gz"
    path.write_bytes(_gz(tmp_path)[:-40])
    with pytest.raises(FastaRecordError, match=r"cut\.fa\.gz: truncated or corrupt gzip"):
        list(read_fasta(path))


def test_corrupt_gzip_header_names_the_file(tmp_path):
    data = bytearray(_gz(tmp_path))
    data[2] = 7  # compression method: not deflate
    path = tmp_path / "bad.fa.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(FastaRecordError, match=r"bad\.fa\.gz: truncated or corrupt gzip"):
        list(read_fasta(path))


def test_directory_given_as_fasta_says_directory(tmp_path):
    with pytest.raises(FastaRecordError, match="is a directory"):
        list(read_fasta(tmp_path))


@pytest.mark.parametrize("gzipped", [False, True])
def test_utf8_bom_is_accepted(tmp_path, gzipped):
    text = "\ufeff>a first\nATGAAA\n>b\nCCC\n".encode()
    path = tmp_path / ("bom.fa.gz" if gzipped else "bom.fa")
    path.write_bytes(gzip.compress(text) if gzipped else text)
    records = list(read_fasta(path, on_bad="error"))
    assert [(r.name, r.sequence) for r in records] == [("a", "ATGAAA"), ("b", "CCC")]


# ----- Evoformer attention -----
def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 3, 8, generator=g) for _ in range(3)]


def test_biases_none_means_no_biases():
    q, k, v = _qkv()
    torch.testing.assert_close(evoformer_attention(q, k, v, None), evoformer_attention_reference(q, k, v))
    with pytest.raises(TypeError, match="biases is a Tensor; expected a list"):
        evoformer_attention(q, k, v, torch.zeros(2, 3, 5, 5))


def test_meta_tensors_are_refused_by_name():
    q = torch.empty(2, 5, 3, 8, device="meta")
    with pytest.raises(ValueError, match="q is a meta tensor"):
        evoformer_attention(q, q, q)


@pytest.mark.parametrize("tile", [2.5, "64", True])
def test_non_integer_tile_elements_is_refused(tile):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="tile_elements=.*expected an int"):
        evoformer_attention(q, k, v, tile_elements=tile)


def test_backend_lists_name_every_backend():
    from ds4sci.models.evoformer import EvoformerStack, set_attention_backend

    with pytest.raises(ValueError, match=r"\['auto', 'naive', 'reference', 'torch', 'triton'\]"):
        set_attention_backend(torch.nn.Linear(1, 1), "flash")
    with pytest.raises(ValueError, match=r"\['auto', 'naive', 'reference', 'torch', 'triton'\]"):
        EvoformerStack(attention_backend="flash", **_STACK)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'naive' is an Evoformer module option"):
        evoformer_attention(q, k, v, backend="naive")


# ----- Evoformer modules -----
_STACK = dict(c_m=8, c_z=4, c_hidden_msa_att=4, c_hidden_opm=2, c_hidden_mul=4, c_hidden_pair_att=4,
              c_s=6, no_heads_msa=2, no_heads_pair=2, no_blocks=1, transition_n=2, msa_dropout=0.0,
              pair_dropout=0.0, blocks_per_ckpt=None, inf=1e9, eps=1e-8)


@pytest.mark.parametrize("chunk", [0, -3, 1.5])
def test_chunk_size_must_be_positive(chunk):
    from ds4sci.models.evoformer import EvoformerStack, TriangleAttention

    stack = EvoformerStack(**_STACK)
    m, z = torch.randn(1, 3, 5, 8), torch.randn(1, 5, 5, 4)
    with pytest.raises(ValueError, match=f"chunk_size={chunk}; expected a positive int"):
        stack(m, z, chunk_size=chunk)
    with pytest.raises(ValueError, match=f"chunk_size={chunk}; expected a positive int"):
        TriangleAttention(4, 4, 2)(z, torch.ones(1, 5, 5), chunk_size=chunk)


def test_wrong_channel_counts_name_the_channel():
    from ds4sci.models.evoformer import EvoformerStack

    stack = EvoformerStack(**_STACK)
    with pytest.raises(ValueError, match=r"m has shape \(1, 3, 5, 7\) with 7 channels; .* C_m=8"):
        stack(torch.randn(1, 3, 5, 7), torch.randn(1, 5, 5, 4))
    with pytest.raises(ValueError, match=r"z has shape \(1, 5, 5, 6\) with 6 channels; .* C_z=4"):
        stack(torch.randn(1, 3, 5, 8), torch.randn(1, 5, 5, 6))


# ----- checkpoints -----
def test_missing_checkpoint_path_says_it_does_not_exist(tmp_path):
    from ds4sci.train.checkpoint import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["[]", '{"step": 3}', '{"step": 3, "files": {"model.safetensors": 5}}',
                                  '{"files": {"a": {"bytes": "x", "sha256": "y"}}}'])
def test_malformed_manifest_is_one_clear_error(tmp_path, text):
    from ds4sci.train.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match="manifest.json is malformed"):
        load_checkpoint(tmp_path)


# ----- ds4sci embed / generate -----
@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from ds4sci.models.genslm import GenSLM, preset, to_hf

    path = tmp_path_factory.mktemp("hf")
    to_hf(GenSLM(preset("genslm-tiny"), seed=0)).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra,match", [
    (["--num", "-1"], "--num=-1; expected >= 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens=-5; expected >= 0"),
    (["--temperature", "nan"], "--temperature=nan; expected a finite number > 0"),
    (["--out", "{tmp}"], "is a directory; expected a file path"),
])
def test_generate_refuses_bad_values(tmp_path, capsys, extra, match):
    # Refused before the model is read: the model path need not exist.
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["generate", "--model", str(tmp_path / "none"), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_generate_keeps_an_ambiguous_prompt_codon(tmp_path, hf_model_dir, capsys):
    out = tmp_path / "g.fasta"
    assert main(["generate", "--model", str(hf_model_dir), "--prompt", "ATGNNNAAA", "--num", "2",
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[1].startswith("ATGNNNAAA") and len(lines[1]) == 18
    assert lines[2] == ">generated_1 prompt=ATGNNNAAA seed=1"


def test_embed_writes_the_path_it_prints(tmp_path, hf_model_dir, capsys):
    fasta = tmp_path / "q.fa"
    fasta.write_text(">a\nATGAAACCC\n")
    assert main(["embed", "--model", str(hf_model_dir), "--fasta", str(fasta), "--out", str(tmp_path / "e.txt")]) == 0
    printed = capsys.readouterr().out
    assert f"-> {tmp_path / 'e.txt'} " in printed
    assert np.load(tmp_path / "e.txt").shape == (1, 64) and not (tmp_path / "e.txt.npy").exists()
    assert main(["embed", "--model", str(hf_model_dir), "--fasta", str(fasta), "--out", str(tmp_path / "e.npy"),
                 "--max-tokens", "-1"]) == 2
    assert "--max-tokens=-1; expected >= 1" in capsys.readouterr().err
    assert main(["embed", "--model", str(tmp_path / "gone"), "--fasta", str(fasta), "--out", str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_states_the_rule_the_tests_use():
    from evoformer_helpers import FLOOR

    from ds4sci.demo import ERROR_FLOOR, _accuracy_rows

    assert ERROR_FLOOR == FLOOR
    _, rows = _accuracy_rows(shape=(1, 2, 17, 2, 8))
    assert [r[0] for r in rows] == ["float32", "bfloat16", "float16"] and all(r[3] for r in rows)
