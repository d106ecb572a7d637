"""Published scores drawn and quoted beside ours: OpenAI's GPT-2 124M, measured by build-nanogpt / llm.c (FineWeb-Edu
validation loss) and by lm-evaluation-harness (HellaSwag, 0-shot). One place for them, and the rule for when they
apply: a reference line belongs on a chart only where the same number was measured on the same data."""

from __future__ import annotations

import os

from eval.hellaswag import ACC, ACC_NORM
from eval.val_loss import VAL_LOSS

MODEL = "GPT-2 124M (OpenAI)"
FINEWEB_EDU = "hf:HuggingFaceFW/fineweb-edu"
# build-nanogpt / llm.c: OpenAI's GPT-2 124M checkpoint on the FineWeb-Edu validation tokens
VAL_LOSS_FINEWEB_EDU = 3.2924
# lm-evaluation-harness `hellaswag`, 0-shot, on the 10,042-item validation set (our `harness` protocol)
HELLASWAG = {ACC: 0.2945, ACC_NORM: 0.3114}
PUBLISHED = {VAL_LOSS: VAL_LOSS_FINEWEB_EDU, **HELLASWAG}


def applicable(cfg) -> dict[str, float]:
    """The published figures comparable to what a run with this config measures: the val loss on FineWeb-Edu
    data, HellaSwag on the whole official validation set; {} for anything else (the smoke run's)."""
    out = {}
    if list(cfg.data.input) == [FINEWEB_EDU]:
        out[VAL_LOSS] = VAL_LOSS_FINEWEB_EDU
    if cfg.eval.hellaswag == "official" and cfg.eval.hellaswag_limit is None:
        out.update(HELLASWAG)
    return out


def hellaswag_label(source: str | None) -> str:
    """What the HellaSwag numbers of a run are, in words: the bundled smoke items are not HellaSwag's."""
    if source == "smoke":
        return "hand-written smoke items (HellaSwag's format, not HellaSwag)"
    if source == "official":
        return "HellaSwag validation set"
    return f"HellaSwag-format items ({os.path.basename(source or '')})"
