import pytest

from spatial_distill import tokenizer as tk

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
SHAPES = ["box", "sphere", "cylinder"]


def _corpus():
    out = []
    for a in COLOURS:
        for b in COLOURS:
            for s in SHAPES:
                out.append(f"Is the {a} {s} touching the {b} box? yes")
                out.append(f"Is the {a} {s} to the left of the {b} sphere? no")
    return out


def test_bpe_trains_saves_and_round_trips(tmp_path):
    tok = tk.train_bpe(_corpus(), 300, str(tmp_path))
    assert tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.backend == "hf_tokenizers"
    text = "Is the purple cylinder near the cyan box?"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids).strip() == text
    # Merges learned from the corpus: a frequent word is one token.
    assert len(tok.encode(" touching")) == 1
    # Reloading the saved file gives the same tokenizer (same hash, same ids).
    again = tk.load_tokenizer(str(tmp_path))
    assert again.sha256 == tok.sha256 and again.encode(text) == tok.encode(text)
    # Unseen text still encodes (byte-level): no <unk>.
    assert 0 not in tok.encode("Zebra 42 ü")


def test_bpe_too_small_or_too_large(tmp_path):
    with pytest.raises(tk.TokenizerError, match="too small"):
        tk.train_bpe(_corpus(), 100, str(tmp_path))
    with pytest.raises(tk.TokenizerError, match="lower config.tokenizer.vocab_size"):
        tk.train_bpe(["yes no"], 5000, str(tmp_path))


def test_sentencepiece_llama_style(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=prefix, vocab_size=80,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    tok = tk.load_tokenizer(str(tmp_path))  # directory lookup finds tokenizer.model
    assert tok.backend == "sentencepiece"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (80, 1, 2, 2)
    ids = tok.encode("Is the red box touching the blue box?", add_bos=True)
    assert ids[0] == 1
    assert tok.decode(ids) == "Is the red box touching the blue box?"


def test_vocab_mismatch_names_both_numbers(tmp_path):
    tok = tk.train_bpe(_corpus(), 300, str(tmp_path))
    tk.check_vocab(tok, 300)
    with pytest.raises(tk.TokenizerError, match="has 300 tokens but the model has a vocabulary of 32000"):
        tk.check_vocab(tok, 32000)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(tk.TokenizerError, match="does not exist"):
        tk.load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(tk.TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        tk.load_tokenizer(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(tk.TokenizerError, match="not a readable"):
        tk.load_tokenizer(str(bad))
