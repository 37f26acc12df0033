"""The arith rule reward, checking on the way that every sample's ``answer`` is its own prompt's
(imported by Ray workers through PYTHONPATH=tests/helpers).

Raises when a sample received another row's answer, which fails the run; with
``CHECKED_ARITH_DIR`` set, each call also leaves a file saying how many samples it checked.
"""

import os
import uuid
from pathlib import Path

from rlhf_dist.tasks import arith


def reward(prompts, responses, answer):
    for p, a in zip(prompts, answer):
        expected = str(arith.answer_of(*arith.parse_prompt(p)))
        if a != expected:
            raise AssertionError(f"sample of {p!r} received answer {a!r}, not {expected!r}")
    out = os.environ.get("CHECKED_ARITH_DIR")
    if out:
        (Path(out) / f"{os.getpid()}-{uuid.uuid4().hex}").write_text(str(len(prompts)))
    return arith.reward(prompts, responses, answer)
