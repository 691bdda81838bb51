"""A count-based character n-gram model on the same data and split as the neural models: the reference row of the
context study (how much a model that only counts the last n-1 characters gets).

    python benchmarks/ngram.py [--order 5] [--discount 0.75] [--data FILE] [--window 64] [--json]

Interpolated absolute discounting (Ney, Essen & Kneser 1994): P(c | h) = max(N(h c) - D, 0) / N(h) + D T(h) / N(h)
P(c | h'), where h' drops the oldest character of h, T(h) counts the distinct characters seen after h, and the
recursion ends in the uniform distribution over the vocabulary. Counts come from the training split only. Scored on
the whole validation split cut into the windows the models are evaluated on (`--window`, their max_len): a character
sees only the earlier characters of its own window, as a model's forward does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict

from spikedecoder.data import TokenData, load_text


def train_counts(ids: list[int], order: int) -> tuple[list[Counter], list[dict], list[dict]]:
    """Per context length k < order: N(h c) keyed (h, c), N(h) and the distinct followers T(h)."""
    joint = [Counter() for _ in range(order)]
    for k in range(order):
        grams = zip(*(ids[i : len(ids) - k + i] for i in range(k + 1)), strict=True)
        joint[k].update(grams)
    totals: list[dict] = [defaultdict(int) for _ in range(order)]
    types: list[dict] = [defaultdict(int) for _ in range(order)]
    for k in range(order):
        for gram, n in joint[k].items():
            totals[k][gram[:-1]] += n
            types[k][gram[:-1]] += 1
    return joint, totals, types


def probability(history: tuple, c: int, model: tuple, vocab: int, discount: float) -> float:
    joint, totals, types = model
    p = 1.0 / vocab
    for k in range(0, len(history) + 1):  # shortest context first, each level interpolates the one below
        h = history[len(history) - k :] if k else ()
        n = totals[k].get(h, 0)
        if n:
            p = max(joint[k].get((*h, c), 0) - discount, 0.0) / n + discount * types[k][h] / n * p
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", type=int, default=5, help="n: characters counted, the predicted one included")
    parser.add_argument("--discount", type=float, default=0.75)
    parser.add_argument("--data", help="UTF-8 text file (default: the built-in Shakespeare corpus)")
    parser.add_argument("--window", type=int, default=64, help="evaluation windows, as the models' max_len")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.order < 1 or not 0.0 < args.discount < 1.0 or args.window < 2:
        parser.error("--order must be >= 1, --discount in (0, 1), --window >= 2")
    start = time.time()
    data = TokenData.from_text(load_text(args.data))
    vocab = data.vocab_size
    model = train_counts(data.train.tolist(), args.order)
    val = data.val.tolist()
    bits, n = 0.0, 0
    for begin in range(0, len(val) - 1, args.window):  # the models' evaluation windows: x = val[b:b+W], y shifted
        window = val[begin : begin + args.window + 1]
        for i in range(1, len(window)):
            history = tuple(window[max(0, i - args.order + 1) : i])
            bits -= math.log2(probability(history, window[i], model, vocab, args.discount))
            n += 1
    result = {
        "order": args.order,
        "discount": args.discount,
        "window": args.window,
        "val_bits_per_char": bits / n,
        "val_chars": n,
        "seconds": round(time.time() - start, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.order}-gram, absolute discounting D={args.discount}: val {result['val_bits_per_char']:.3f} "
            f"bits/char over {n:,} characters in windows of {args.window} ({result['seconds']} s)",
            file=sys.stdout,
        )


if __name__ == "__main__":
    main()
