"""One check of token ids for every entry point (the model's forward, generation), so that both accept the same
inputs and reject bad ones with the same one-line message naming the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor

INT_DTYPES = (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_token_ids(
    idx: Tensor, vocab_size: int, what: str = "input", max_len: int | None = None, start: int = 0
) -> None:
    """Raise TypeError/ValueError unless idx is a non-empty (B, S) tensor of integer ids in [0, vocab_size) and,
    with max_len, start + S positions fit in it (`what` names the argument in the message: input, prompt)."""
    if not isinstance(idx, Tensor) or idx.dtype not in INT_DTYPES:
        raise TypeError(
            f"the {what} must be a tensor of integer token ids, got {type(idx).__name__} "
            f"{getattr(idx, 'dtype', '')}; encode text with the tokenizer first"
        )
    if idx.dim() != 2:
        raise ValueError(
            f"the {what} must have shape (B, S), got {tuple(idx.shape)}; add a batch dimension with idx[None]"
        )
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(
            f"empty {what} (shape {tuple(idx.shape)}): give at least one token per row, e.g. the id of a newline"
        )
    if max_len is not None and start + idx.shape[1] > max_len:
        raise ValueError(
            f"{start + idx.shape[1]} positions exceed max_len={max_len}; crop the {what} to the last max_len "
            "tokens (generate() slides the window for you)"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} token id {lo if lo < 0 else hi} is outside the model's vocabulary [0, {vocab_size}); "
            "use the tokenizer saved with the model's checkpoint"
        )
