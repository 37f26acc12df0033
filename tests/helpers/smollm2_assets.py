"""SmolLM2-135M-Instruct converted once per test session (``builtin:smollm2-135m-instruct``).

Every test module that needs the model calls ``converted(tmp_path_factory)`` from a fixture of
its own: the first call converts the packaged GGUF file (~30 s) into the session's base
temporary directory, later calls find it there and return at once (``build_assets`` reuses a
complete directory)."""

from __future__ import annotations

from pathlib import Path

from rlhf_dist.tasks import smollm2


def assets_dir(tmp_path_factory) -> Path:
    """The session's ``model.assets_dir`` holding the converted model."""
    return tmp_path_factory.getbasetemp() / "smollm2_assets"


def converted(tmp_path_factory) -> Path:
    """The converted model's HF directory (``<assets_dir>/smollm2-135m-instruct``)."""
    return smollm2.build_assets(assets_dir(tmp_path_factory) / smollm2.NAME)
