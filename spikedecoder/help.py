"""What the command line says besides its results: the examples and rules in `--help` (with every option's default),
and the message of an interrupted command."""

from __future__ import annotations

import argparse

EXAMPLES = {
    "export": """examples:
  spikedecoder export runs/make-run/spikedecoder snn.bin && make -C runtime && runtime/sd snn.bin -p "ROMEO:"
  spikedecoder export runs/make-run/ann ann.bin       # the ANN twin runs in the same runtime""",
    "train": """examples:
  spikedecoder train configs/run.toml --preset spikedecoder --out runs/snn
  spikedecoder train configs/run.toml --preset ann --data my.txt --steps 2000 --out runs/ann
  spikedecoder train configs/run.toml --set model.norm=power --set train.lr=1e-3 --out runs/snn-pn
  spikedecoder train configs/run.toml --out runs/snn --resume      # continue an interrupted run
  spikedecoder train configs/run.toml --set train.distill=runs/make-run/ann --out runs/snn-kd   # learn from the ANN
  spikedecoder train configs/run.toml --set train.rate_weight=0.1 --set train.rate_target=0.05 --out runs/sparse""",
    "compare": """examples:
  spikedecoder compare configs/run.toml --out runs/make-run        # what `make run` does
  spikedecoder compare configs/run.toml --presets spikedecoder spiking-attention ann --out runs/ladder
  spikedecoder compare configs/run.toml --set train.distill=ann --out runs/distilled
      # the ANN first, then every other preset distilled from it (OUT/ann); the teacher's cost is printed

training levers (train.KEY, all off by default; see configs/run.toml):
  distill = "ann"          a preset of this compare (trained first, without a teacher) or a run directory:
                           loss = (1 - distill_weight) * CE + distill_weight * distill_temperature^2 * KL(teacher ||
                           student) at that temperature; the teacher's training seconds and its forward time per
                           step are recorded (results.json, OUT/NAME/checkpoint/training.json)
  rate_weight = 0.1        firing-rate regulariser: + rate_weight * mean over LIF layers of max(0, rate - target)^2
  rate_target = 0.05       spikes per neuron per step, or a table of glob patterns over the LIF layers' names""",
    "generate": """examples:
  spikedecoder generate runs/make-run/spikedecoder --prompt "ROMEO:" --tokens 300
  spikedecoder generate runs/snn --prompt "JULIET:" --greedy --stop "\\n\\n"
  spikedecoder generate runs/snn --prompt "KING:" --temperature 0.8 --top-k 20 --seed 1""",
    "evaluate": """examples:
  spikedecoder evaluate runs/make-run/spikedecoder
  spikedecoder evaluate runs/make-run/spikedecoder --data other.txt --unknown skip --json
  spikedecoder evaluate runs/snn --split test --json""",
    "info": """examples:
  spikedecoder info runs/make-run/spikedecoder
  spikedecoder info --preset spikedecoder --set model.n_layer=6""",
    "energy": """examples:
  spikedecoder energy runs/make-run/spikedecoder --baseline runs/make-run/ann
  spikedecoder energy runs/snn --baseline-preset ann --preset fp16 --json
  spikedecoder energy runs/snn --baseline runs/ann --plot energy.png""",
    "serve": """examples:
  spikedecoder serve runs/make-run/spikedecoder --baseline runs/make-run/ann     # then open http://127.0.0.1:8000/
  curl -N 'http://127.0.0.1:8000/api/generate?prompt=ROMEO:&tokens=20&seed=0'""",
    "study": """examples:
  spikedecoder study configs/studies/default.toml --out runs/study
  spikedecoder study configs/studies/toy.toml --out /tmp/toy        # a two-variant smoke run""",
}


PRECEDENCE = """settings, highest precedence first:
  1. the command line: --set SECTION.KEY=VALUE, --steps, --data, --minutes
     (--set presets.NAME.KEY=VALUE beats --set model.KEY=VALUE for preset NAME)
  2. the config file's [presets.NAME] section (a study variant's own tables)
  3. the config file's shared [model] and [train] sections
  4. the preset's defaults"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples and epilogs kept as written; every option that has a default shows it (an option whose default is
    None says in its own help what leaving it out means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


SAFETY = """safety: a run directory that holds a run is never overwritten unasked: add --resume to continue it or
--force to train anew (its checkpoint and log stay until the new run writes its first checkpoint). --resume goes on
only as the run was started: on another text with --data-changed ok, with other optimisation settings (lr,
batch_size, ...) with --settings-changed ok; max_steps, max_minutes, the intervals, log and device may change.
A run directory is locked while a training writes it: a second one into it stops at once."""


INTERRUPTED = {
    "train": "interrupted; the last checkpoint is kept (continue with --resume)",  # training says more when it can
    "compare": "interrupted; the last checkpoints are kept (continue with --resume)",
    "study": "interrupted; finished variants and the last checkpoints are kept (rerun the same command to go on)",
    "generate": "interrupted; the text generated so far is printed above",
}
