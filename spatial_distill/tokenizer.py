"""Tokenizers: the teacher's (loaded from a local path) and the built-in BPE for synthetic data.

The student shares the teacher's tokenizer (DESIGN.md §4): for LLaVA-3D that is the Llama-2
SentencePiece model (32,000 pieces, `<unk>`=0, `<s>`=1, `</s>`=2, no pad). For the built-in
synthetic data we train a small byte-level BPE on the QA corpus and save it in the workdir, so
the whole pipeline runs without downloading anything.

Every tokenizer is wrapped in `Tokenizer`, which exposes the same few things either way
(`encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `sha256`), and
`check_vocab` refuses a tokenizer whose vocabulary does not match a model's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 in the built-in BPE, Llama-2 order
BPE_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class TokenizerError(ValueError):
    """A tokenizer is missing, unreadable, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer, backend-agnostic. `pad_id` falls back to `eos_id` when none exists."""

    path: str
    backend: str  # "sentencepiece" | "hf_tokenizers"
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    sha256: str
    _impl: object = dataclasses.field(repr=False, compare=False)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if self.backend == "sentencepiece":
            ids = list(self._impl.encode(text))
        else:
            ids = list(self._impl.encode(text, add_special_tokens=False).ids)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            specials = {self.bos_id, self.eos_id, self.pad_id}
            ids = [i for i in ids if i not in specials]
        if self.backend == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        if self.backend == "sentencepiece":
            return self._impl.id_to_piece(int(i))
        return self._impl.id_to_token(int(i)) or f"<{i}>"

    def summary(self) -> str:
        return (f"{self.backend} tokenizer {self.path}: vocab {self.vocab_size}, bos {self.bos_id}, "
                f"eos {self.eos_id}, pad {self.pad_id}, sha256 {self.sha256[:12]}")


def _sha256(paths: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a tokenizer from a local path; never downloads.

    `path` may be a SentencePiece `tokenizer.model` (Llama-2), an HF `tokenizer.json`, or a
    directory holding either (an HF tokenizer directory; `tokenizer.json` is preferred).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (BPE_FILE, SENTENCEPIECE_FILE):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise TokenizerError(
            f"tokenizer directory {path!r} has neither {BPE_FILE} nor {SENTENCEPIECE_FILE}; point "
            "config.tokenizer.path at the teacher's tokenizer (e.g. the LLaVA-3D checkpoint dir)"
        )
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer {path!r} does not exist")
    digest = _sha256([path])
    if path.endswith(".json"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            impl = HFTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a readable tokenizers JSON file ({e})") from e
        vocab = impl.get_vocab_size(with_added_tokens=True)

        def tid(*names):
            for n in names:
                i = impl.token_to_id(n)
                if i is not None:
                    return i
            return None

        bos, eos, pad = tid("<s>", "<|begin_of_text|>"), tid("</s>", "<|end_of_text|>"), tid("<pad>")
        if bos is None or eos is None:
            raise TokenizerError(f"{path}: no BOS/EOS token found (looked for <s> and </s>)")
        return Tokenizer(path, "hf_tokenizers", vocab, bos, eos, eos if pad is None else pad,
                         digest, impl)
    import sentencepiece as spm

    impl = spm.SentencePieceProcessor()
    try:
        impl.Load(path)
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from e
    bos, eos, pad = impl.bos_id(), impl.eos_id(), impl.pad_id()
    if bos < 0 or eos < 0:
        raise TokenizerError(f"{path}: SentencePiece model defines no BOS/EOS (bos={bos}, eos={eos})")
    return Tokenizer(path, "sentencepiece", impl.get_piece_size(), bos, eos,
                     eos if pad < 0 else pad, digest, impl)


def train_bpe(corpus: Iterable[str], vocab_size: int, out_dir: str) -> Tokenizer:
    """Trains a byte-level BPE of exactly `vocab_size` entries on `corpus`, saves it, loads it.

    Byte-level, so any text (numbers, unseen colour names) encodes without `<unk>`. The special
    tokens take ids 0..3 in Llama-2 order (`<unk>`, `<s>`, `</s>`) plus `<pad>`.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise TokenizerError(f"BPE vocab_size {vocab_size} is too small: byte-level BPE needs at "
                             f"least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise TokenizerError(
            f"the QA corpus only supports {got} BPE entries, fewer than the requested vocab_size "
            f"{vocab_size}; lower config.tokenizer.vocab_size to {got} or use more scenes"
        )
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, BPE_FILE)
    tmp = final + ".tmp"
    tok.save(tmp)
    os.replace(tmp, final)
    return load_tokenizer(final)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, *, what: str = "model") -> None:
    """Refuses a tokenizer whose vocabulary size differs from the model's, naming both."""
    if tokenizer.vocab_size != int(model_vocab_size):
        raise TokenizerError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the {what} has a "
            f"vocabulary of {model_vocab_size}; use the teacher's tokenizer or set the model's "
            f"vocab_size to {tokenizer.vocab_size}"
        )
