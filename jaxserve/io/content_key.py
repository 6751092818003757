"""What a result depends on, as hashes: a resumed job reuses a finished result only when the
request, the model and the engine settings that shape it are all unchanged.

Three parts, kept apart so that a resume can say why it recomputes a record:

- request: the line's bytes and its resolved sampling parameters (so a changed batch-level default
  such as --max_tokens changes exactly the lines that use it);
- model: what the weights, config and tokenizer are (for a file: path, size, mtime; for a
  directory: config.json's bytes and each weight / tokenizer file's name, size and mtime; for a
  preset or dummy weights: name, load format, seed);
- engine: the settings that change outputs (dtype, load format, seed, max_model_len). Batch
  shapes, page sizes and kernels change speed, not results, and are left out so that a job can
  be resumed with a different token budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

# Files of a checkpoint directory that determine its outputs (weights, config, tokenizer, chat
# template). Named, not globbed: an output or dry-run file written into the model folder must not
# change the model's identity.
_DIR_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
              "chat_template.json", "chat_template.jinja"}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True,
                                     separators=(",", ":")).encode()).hexdigest()[:32]


def _stat(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    source: str      # what the job names: an absolute path or a preset name (the job's identity)
    content: str     # hash of what the files are now (changes when the weights are replaced)


def model_identity(model: Optional[str], load_format: str = "auto", seed: int = 0) -> ModelIdentity:
    """Raises the loaders' own errors (WeightError / ConfigError) for a model that is not there."""
    from jaxserve.weights import presets

    if model is None:
        from jaxserve.weights import default_model_path

        model = default_model_path()
    desc: dict[str, Any] = {"load_format": load_format}
    if load_format == "dummy":
        desc["seed"] = seed   # random weights: the seed is the weights
    if os.path.isdir(model):
        source = os.path.realpath(model)
        try:
            with open(os.path.join(model, "config.json"), "rb") as f:
                desc["config"] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            desc["config"] = None   # the loader says what is wrong
        weights = load_format != "dummy"   # dummy weights do not read the weight files
        desc["files"] = sorted([name, *_stat(os.path.join(model, name))]
                               for name in os.listdir(model)
                               if (name in _DIR_FILES or name.endswith(".jinja")
                                   or (weights and name.endswith(".safetensors")))
                               and os.path.isfile(os.path.join(model, name)))
    elif os.path.isfile(model):
        source = os.path.realpath(model)
        desc["file"] = _stat(model)
    elif presets.is_preset(model):
        source = model
        desc["preset"] = presets.preset_dict(model)
    else:
        from jaxserve.config import ConfigError
        from jaxserve.weights import WeightError

        if os.sep in model or model.startswith(".") or model.endswith(".gguf"):
            raise WeightError(f"{model}: file or directory not found")
        raise ConfigError(f"{model!r} is not a checkpoint directory, a .gguf file or a preset "
                          f"(presets: {', '.join(presets.list_presets())})")
    return ModelIdentity(source, _sha({"source": source, **desc}))


def engine_identity(*, dtype: str, load_format: str, seed: int, max_model_len: Optional[int]) -> str:
    """`dtype` as resolved ("auto" means different dtypes on CPU and GPU)."""
    return _sha({"dtype": dtype, "load_format": load_format, "seed": seed,
                 "max_model_len": max_model_len})


_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolved_dtype(dtype: str) -> str:
    if dtype not in (None, "auto"):
        return _DTYPE_NAMES.get(str(dtype), str(dtype))
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def request_hash(item, defaults: dict) -> str:
    """The line's bytes, its format and its resolved sampling parameters. A line that failed to
    parse has no parameters: its error may come from a default (e.g. min_tokens above the default
    max_tokens), so the defaults count for it instead."""
    params = dataclasses.asdict(item.params) if item.params is not None else None
    return _sha({"line": item.line_hash, "fmt": item.fmt, "params": params,
                 "defaults": defaults if params is None else None})
