"""Codon tokenizer, FASTA reading, variant simulator and token files."""

import gzip
import json

import numpy as np
import pytest

from ds4sci.data.corpus import default_records, reference_genome
from ds4sci.data.dataset import TokenDataset, build_token_dir, collate
from ds4sci.data.fasta import FastaRecordError, read_fasta
from ds4sci.data.simulate import simulate_variants
from ds4sci.data.tokenizer import CodonTokenizer

# GenSLM's codon_wordlevel_69vocab.json (ramanathanlab/genslm), codons in id order from 5.
GENSLM_CODONS = (
    "GGC GCC ATC GAC GAA ATG GTG CTG GTC GCG GAT AAA GGT AAG GAG ACC AAC GTT ATT GCA CTC CGC GCT "
    "CAG CCG TTC GTA TCG GGA AAT TAC CTT TTG ACG TCC GGG AGC CCC ACA ACT TCT TTA CGT TAT CAA CGG "
    "TTT CAC CCT CCA TGG ATA TCA TGC AGT AGA CAT TGT CTA AGG TAA CGA TGA TAG"
).split()


def test_vocabulary_is_genslms():
    tok = CodonTokenizer()
    assert len(tok) == 69
    assert [tok.vocab[t] for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert [tok.vocab[c] for c in GENSLM_CODONS] == list(range(5, 69))
    tok71 = CodonTokenizer("genslm-71")
    assert len(tok71) == 71 and (tok71.bos_id, tok71.eos_id, tok71.pad_id) == (2, 3, 5)
    assert [tok71.vocab[c] for c in GENSLM_CODONS] == list(range(7, 71))


def test_encode_rules():
    tok = CodonTokenizer()
    atg, ggc = tok.vocab["ATG"], tok.vocab["GGC"]
    assert tok.encode("ATGGGC") == [atg, ggc]
    assert tok.encode("atg ggc\n") == [atg, ggc]  # lower case, whitespace
    assert tok.encode("AUGGGC") == [atg, ggc]  # RNA
    assert tok.encode("AT-G.GGC") == [atg, ggc]  # alignment gaps
    assert tok.encode("ATGNGC") == [atg, 0]  # ambiguity code -> [UNK]
    assert tok.encode("ATGGGCAT") == [atg, ggc, 0]  # trailing partial codon -> [UNK] (GenSLM)
    assert CodonTokenizer(partial="drop").encode("ATGGGCAT") == [atg, ggc]
    assert tok.encode("CATGGGC", frame=1) == [atg, ggc]  # reading frame offset
    assert CodonTokenizer("genslm-71").encode("ATG") == [2, CodonTokenizer("genslm-71").vocab["ATG"], 3]
    assert tok.decode(tok.encode("ATGGGC")) == "ATGGGC"
    with pytest.raises(ValueError, match=r"character 'X' at position 4"):
        tok.encode("ATGXGC")
    with pytest.raises(ValueError, match="frame=3"):
        tok.encode("ATG", frame=3)
    with pytest.raises(ValueError, match="id 99 is outside the vocabulary"):
        tok.decode([99])


def test_saved_json_loads_in_hf_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    for vocab in ("genslm-69", "genslm-71"):
        tok = CodonTokenizer(vocab)
        path = tmp_path / f"{vocab}.json"
        tok.save(path)
        hf = tokenizers.Tokenizer.from_file(str(path))
        seq = "ATGGGCTTTAAANNN"
        assert hf.encode(" ".join(tok.codons(seq))).ids == tok.encode(seq)
        assert CodonTokenizer(path).encode(seq) == tok.encode(seq)


def test_read_fasta_plain_gz_and_bad_records(tmp_path, caplog):
    text = ">good one\nACGT\nacgu\n>bad\nACGTXX\n>empty\n\n>ok2\nNNNN-ACG\n"
    plain = tmp_path / "a.fasta"
    plain.write_text(text)
    gz = tmp_path / "a.fasta.gz"
    with gzip.open(gz, "wt") as f:
        f.write(text)
    for path in (plain, gz):
        recs = list(read_fasta(path))
        assert [r.name for r in recs] == ["good", "ok2"]
        assert recs[0].sequence == "ACGTACGU" and recs[0].description == "good one"
    assert "record 'bad': letter 'X' at position 5" in caplog.text
    with pytest.raises(FastaRecordError, match=r"record 'bad': letter 'X' at position 5"):
        list(read_fasta(plain, on_bad="error"))
    notfasta = tmp_path / "x.txt"
    notfasta.write_text("hello\n")
    with pytest.raises(FastaRecordError, match="not a valid FASTA file"):
        list(read_fasta(notfasta))
    empty = tmp_path / "e.fa"
    empty.write_text("")
    with pytest.raises(FastaRecordError, match="no FASTA records"):
        list(read_fasta(empty))
    with pytest.raises(FileNotFoundError, match="no such FASTA file"):
        list(read_fasta(tmp_path / "missing.fa"))


def test_reference_genome_is_vendored():
    name, seq = reference_genome()
    assert name == "MN908947.3" and len(seq) == 29903 and seq.startswith("ATTAAAGGTTTATACC")


def test_simulator_is_seeded_and_realistic():
    _, ref = reference_genome()
    a = simulate_variants(ref, 20, seed=3)
    b = simulate_variants(ref, 20, seed=3)
    assert [v.sequence for v in a] == [v.sequence for v in b]
    assert [v.sequence for v in simulate_variants(ref, 20, seed=4)] != [v.sequence for v in a]
    assert any(v.parent.startswith("sim_") for v in a)  # lineages, not all from the reference
    assert all(abs(len(v.sequence) - len(ref)) < 200 for v in a)
    # Transitions outnumber transversions among substitutions from the reference.
    direct = [v for v in a if v.parent == "reference" and v.insertions == v.deletions == 0]
    transitions = {("A", "G"), ("G", "A"), ("C", "T"), ("T", "C")}
    ts = tv = 0
    for v in direct:
        for x, y in zip(ref, v.sequence):
            if x != y:
                ts += (x, y) in transitions
                tv += (x, y) not in transitions
    assert ts > 2 * tv > 0


def test_token_dir_round_trip_and_split(tmp_path):
    tok = CodonTokenizer()
    records = list(default_records(9, seed=0))
    meta = build_token_dir(records, tok, tmp_path, val_fraction=0.2)
    assert meta["records"] == {"train": 8, "val": 2}
    train, val = TokenDataset(tmp_path, "train"), TokenDataset(tmp_path, "val")
    assert len(train) == 8 and len(val) == 2
    assert train[0].tolist() == tok.encode(records[0][1])
    assert val[0].tolist() == tok.encode(records[4][1])
    assert json.loads((tmp_path / "meta.json").read_text())["names"]["val"] == [records[4][0], records[9][0]]
    assert isinstance(train.tokens, np.memmap)
    ids, labels = collate([train[0][:5], train[1][:3]], pad_id=tok.pad_id)
    assert ids.tolist()[1] == train[1][:3].tolist() + [3, 3]
    assert labels.tolist()[1][3:] == [-100, -100]
