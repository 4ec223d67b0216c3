"""Codon tokenizer with GenSLM's vocabularies (1 token = 3 nucleotides).

The default vocabulary is GenSLM's ``codon_wordlevel_69vocab.json`` (ramanathanlab/genslm):
``[UNK] [CLS] [SEP] [PAD] [MASK]`` then 64 codons in that file's order; ``genslm-71`` is its
variant with ``[BOS]``/``[EOS]`` wrapped around each sequence. Both ship with ds4sci and are read
and written in the HF ``tokenizers`` JSON format (WordLevel model, whitespace pre-tokenizer).

How a sequence becomes codons (GenSLM's ``group_by_kmer`` plus explicit rules for the rest):
- letters are upper-cased; ``U`` is read as ``T`` (RNA);
- whitespace and alignment gaps (``-`` and ``.``) are removed before grouping;
- ``frame`` (0, 1 or 2) nucleotides are skipped at the start (reading frame offset);
- a codon containing ``N`` or another IUPAC ambiguity code becomes ``[UNK]``;
- a trailing partial codon (1-2 nucleotides) becomes ``[UNK]`` as in GenSLM
  (``partial="unk"``), or is dropped (``partial="drop"``);
- any other character is an error naming it and its position.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from .fasta import IUPAC_DNA

VOCABULARIES = {"genslm-69": "codon_wordlevel_69vocab.json", "genslm-71": "codon_wordlevel_71vocab.json"}
_REMOVED = re.compile(r"[\s.\-]")
_INVALID = re.compile(f"[^{IUPAC_DNA}]")


class CodonTokenizer:
    def __init__(self, vocab: str | Path = "genslm-69", partial: str = "unk"):
        """vocab: ``"genslm-69"``, ``"genslm-71"`` or a path to an HF tokenizers JSON file."""
        if partial not in ("unk", "drop"):
            raise ValueError(f"CodonTokenizer: partial={partial!r}; expected 'unk' or 'drop'")
        self.partial = partial
        if str(vocab) in VOCABULARIES:
            text = resources.files("ds4sci.data").joinpath("files", VOCABULARIES[str(vocab)]).read_text()
        else:
            path = Path(vocab)
            if not path.is_file():
                raise FileNotFoundError(
                    f"CodonTokenizer: vocab={str(vocab)!r} is neither one of {sorted(VOCABULARIES)} nor a file"
                )
            text = path.read_text()
        self._spec = json.loads(text)
        model = self._spec.get("model", {})
        if model.get("type") != "WordLevel" or "vocab" not in model:
            raise ValueError(f"CodonTokenizer: {vocab}: expected an HF tokenizers WordLevel JSON file")
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.unk_id = self.vocab[model.get("unk_token", "[UNK]")]
        self.pad_id = self.vocab["[PAD]"]
        self.bos_id, self.eos_id = self.vocab.get("[BOS]"), self.vocab.get("[EOS]")
        self.add_bos_eos = (self._spec.get("post_processor") or {}).get("type") == "TemplateProcessing"
        self.codon_ids = {t: i for t, i in self.vocab.items() if len(t) == 3 and not t.startswith("[")}
        if len(self.codon_ids) != 64:
            raise ValueError(f"CodonTokenizer: {vocab}: found {len(self.codon_ids)} codons; expected 64")

    def __len__(self) -> int:
        return len(self.vocab)

    def codons(self, sequence: str, frame: int = 0) -> list[str]:
        """The sequence cleaned and grouped into codons (partial last codon per ``partial``)."""
        if frame not in (0, 1, 2):
            raise ValueError(f"CodonTokenizer: frame={frame}; expected 0, 1 or 2")
        seq = _REMOVED.sub("", sequence.upper()).replace("U", "T")
        bad = _INVALID.search(seq)
        if bad is not None:
            raise ValueError(
                f"CodonTokenizer: character {bad.group()!r} at position {bad.start() + 1} (after "
                f"removing whitespace and gaps) is not a nucleotide code ({IUPAC_DNA})"
            )
        seq = seq[frame:]
        end = len(seq) if self.partial == "unk" else len(seq) - len(seq) % 3
        return [seq[i : i + 3] for i in range(0, end, 3)]

    def encode(self, sequence: str, frame: int = 0) -> list[int]:
        ids = [self.codon_ids.get(c, self.unk_id) for c in self.codons(sequence, frame)]
        if self.add_bos_eos:
            ids = [self.bos_id, *ids, self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Codons joined into a nucleotide string; special tokens dropped (or kept as ``[X]``)."""
        out = []
        for i in ids:
            token = self.id_to_token.get(int(i))
            if token is None:
                raise ValueError(f"CodonTokenizer.decode: id {int(i)} is outside the vocabulary (size {len(self)})")
            if token.startswith("["):
                if not skip_special_tokens:
                    out.append(token)
                continue
            out.append(token)
        return "".join(out)

    def save(self, path: str | Path) -> None:
        """Write the HF ``tokenizers`` JSON (loadable by ``tokenizers.Tokenizer.from_file``)."""
        Path(path).write_text(json.dumps(self._spec, indent=1))
