"""The text tokenizer: sentencepiece trained deterministically on captions, our id conventions (no bos, eos appended,
empty caption = [eos]), unknown characters, other models' id layouts, bytes round trip and the mismatch checks."""
import io
import os

import pytest
import sentencepiece as spm

from dpar_scale.config import TextConfig
from dpar_scale.text import (TextTokenizer, TextTokenizerError, check_text_config, check_text_tokenizer,
                             load_text_tokenizer, train_text_tokenizer)

from sampling_fixtures import load_tool

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["disc", "square", "ring", "triangle", "star"]
CAPTIONS = [f"a {size} {c} {s} on a {bg} background, {pos}" for size in ("small", "large")
            for c in COLOURS for s in SHAPES for bg, pos in (("flat grey", "upper left"), ("graded blue", "centre"))]


def _raw_model(**ids) -> bytes:
    """A sentencepiece model trained outside our wrapper, with another id layout (as T5 / LLaMA ship them)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_writer=out, vocab_size=40,
                                   num_threads=1, minloglevel=2, **ids)
    return out.getvalue()


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(CAPTIONS, 40)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic_and_round_trips(model_type, tmp_path):
    a = train_text_tokenizer(CAPTIONS, 40, model_type)
    b = train_text_tokenizer(CAPTIONS, 40, model_type)
    assert a.to_bytes() == b.to_bytes() and a.sha256 == b.sha256 and a.vocab_size == 40
    a.save(str(tmp_path / "t.model"))
    loaded = load_text_tokenizer(str(tmp_path / "t.model"))
    assert loaded.sha256 == a.sha256 == __import__("hashlib").sha256((tmp_path / "t.model").read_bytes()).hexdigest()
    again = TextTokenizer.from_bytes(loaded.to_bytes())
    for text in CAPTIONS[:20]:
        ids = loaded.encode(text)
        assert ids == again.encode(text) and ids[-1] == loaded.eos_id and loaded.eos_id not in ids[:-1]
        assert loaded.decode(ids) == text and loaded.count_unknown(ids) == 0
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_the_tool_writes_identical_files_and_reports(tmp_path, capsys):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(f'{{"path": "x/{i}.png", "caption": "{c}"}}\n' for i, c in enumerate(CAPTIONS)))
    tool = load_tool("train_text_tokenizer")
    for name in ("a.model", "b.model"):
        assert tool.main(["--captions", str(captions), "--vocab-size", "40", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    out = capsys.readouterr().out
    assert "vocab_size 40 (eos 1, pad 0, unk 2" in out and "model.text.vocab_size=40" in out
    assert tool.main(["--captions", str(captions), "--model", str(tmp_path / "a.model")]) == 0
    assert "truncated at model.text.max_length = 16:" in capsys.readouterr().out
    assert tool.main(["--captions", str(captions), "--model", str(tmp_path / "a.model"), "--vocab-size", "9"]) == 2
    assert "one or the other" in capsys.readouterr().err
    assert tool.main(["--captions", str(captions), "--vocab-size", "5000", "--out", str(tmp_path / "c.model")]) == 2
    assert "Vocabulary size too high" in capsys.readouterr().err and not (tmp_path / "c.model").exists()


def test_our_id_conventions_and_truncation(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2) and not tok.byte_fallback
    assert tok.empty_ids == [tok.eos_id] and tok.encode("") == [tok.eos_id] and tok.decode(tok.empty_ids) == ""
    assert tok.encode("   ") == [tok.eos_id]
    full = tok.encode(CAPTIONS[0])
    short = tok.encode("red disc")
    assert 2 < len(short) < len(full)
    ids, truncated = tok.encode_captions([CAPTIONS[0], "", "red disc"], max_length=len(short))
    assert truncated == 1 and ids[0] == full[:len(short) - 1] + [tok.eos_id] and ids[1] == [tok.eos_id]
    assert ids[2] == short  # exactly max_length long: not truncated
    with pytest.raises(TextTokenizerError, match="max_length must be >= 2"):
        tok.encode_captions(["x"], 1)


def test_unknown_characters_are_unk_or_bytes(tok):
    text = "a red disc ✓ 日本 </s>"
    ids = tok.encode(text)
    assert tok.count_unknown(ids) >= 3  # ✓, the two CJK characters (and '<' '/' '>' the captions never used)
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id  # "</s>" written in a caption is not eos
    many = [c + f" {i}" for i, c in enumerate(CAPTIONS)]
    fallback = train_text_tokenizer(many, 300, byte_fallback=True)
    assert fallback.byte_fallback
    ids = fallback.encode(text)
    assert fallback.count_unknown(ids) == 0 and fallback.decode(ids) == text  # nothing lost
    with pytest.raises(TextTokenizerError, match="raise --vocab-size"):
        train_text_tokenizer(many, 280, byte_fallback=True)
    with pytest.raises(TextTokenizerError, match="leaves no room"):
        train_text_tokenizer(CAPTIONS, 200, byte_fallback=True)


def test_prompts_with_unspellable_characters_are_named(tok):
    """Sampling names the characters of a prompt that become unk (nothing the user wrote disappears silently);
    spellable prompts, and every prompt under byte fallback, are not reported."""
    from dpar_scale.sampling.prompts import describe_unspellable, unspellable_characters

    prompts = ["a red disc", "a red disc ✓ 日本", "a large ring", "ünï"]
    found = unspellable_characters(tok, prompts)
    assert found == {1: ["✓", "日", "本"], 3: ["ü", "ï"]}
    line = describe_unspellable(found, prompts, limit=1)
    assert line.startswith("2 prompt(s) hold characters the text tokenizer cannot spell")
    assert "'a red disc ✓ 日本': '✓' '日' '本' (and 1 more)" in line and describe_unspellable({}, prompts) == ""
    fallback = train_text_tokenizer([c + f" {i}" for i, c in enumerate(CAPTIONS)], 300, byte_fallback=True)
    assert unspellable_characters(fallback, prompts) == {}


def test_other_models_id_layouts(tmp_path):
    # LLaMA's layout: unk 0, bos 1, eos 2, no pad. We never add bos; pad falls back to eos.
    llama = TextTokenizer.from_bytes(_raw_model(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), "llama-like")
    ids = llama.encode("a red disc")
    assert (llama.eos_id, llama.pad_id, llama.unk_id) == (2, 2, 0) and ids[-1] == 2 and 1 not in ids
    assert llama.decode(ids) == "a red disc"
    # T5's layout: pad 0, eos 1, unk 2 (ours); a model file given by path
    (tmp_path / "spiece.model").write_bytes(_raw_model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    t5 = load_text_tokenizer(str(tmp_path / "spiece.model"))
    assert (t5.pad_id, t5.eos_id, t5.unk_id) == (0, 1, 2) and t5.empty_ids == [1]
    with pytest.raises(TextTokenizerError, match="has no eos piece"):
        TextTokenizer.from_bytes(_raw_model(unk_id=0, bos_id=1, eos_id=-1), "no-eos")
    with pytest.raises(TextTokenizerError, match="is not a sentencepiece model"):
        TextTokenizer.from_bytes(b"not a model at all", "junk.model")
    with pytest.raises(FileNotFoundError, match="train_text_tokenizer.py"):
        load_text_tokenizer(str(tmp_path / "missing.model"))


def test_a_model_that_does_not_match_is_refused(tok):
    check_text_tokenizer(tok.identity(), TextTokenizer.from_bytes(tok.to_bytes()))  # the same file: fine
    smaller = train_text_tokenizer(CAPTIONS, 36)
    with pytest.raises(TextTokenizerError, match=r"not the one the checkpoint was trained with .*a different "
                                                 r"vocabulary \(40 pieces there, 36"):
        check_text_tokenizer(tok.identity(), smaller)
    same_size = train_text_tokenizer(CAPTIONS, 40, "bpe")
    with pytest.raises(TextTokenizerError, match="same vocabulary size .40. but different pieces"):
        check_text_tokenizer(tok.identity(), same_size, where="the export")
    with pytest.raises(TextTokenizerError, match="records no text tokenizer"):
        check_text_tokenizer({}, tok)
    check_text_config(TextConfig(tokenizer="t.model", vocab_size=48), tok)  # padded rows are fine
    with pytest.raises(TextTokenizerError, match=r"model\.text\.vocab_size=39 is smaller .* set "
                                                 r"model\.text\.vocab_size >= 40"):
        check_text_config(TextConfig(tokenizer="t.model", vocab_size=39), tok)
