"""transformers models built from a config JSON, with no weights and no download.

Used by ``leanopt partition --hf-config`` (on the ``meta`` device) and by the benchmark's
``--hf-config`` runs. transformers is imported only when these functions are called.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HFConfigError", "load_hf_config", "build_hf_model"]


class HFConfigError(ValueError):
    """A config file that does not give a transformers model; the message says why."""


def load_hf_config(path: str | Path) -> Any:
    """A transformers config from a config JSON (or a folder holding ``config.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise HFConfigError(f"config file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise HFConfigError(f"{path} has no 'model_type'; it does not look like a transformers config")
    try:
        import transformers
    except ImportError:
        raise HFConfigError("--hf-config needs the transformers package: pip install transformers") from None
    model_type = cfg.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise HFConfigError(f"transformers cannot build a config of model_type {model_type!r}: {e}") from None


def build_hf_model(config: str | Path | Any, *, meta: bool = True, causal_lm: bool = False) -> nn.Module:
    """The model of a config (or of a config file): the class its ``architectures`` name,
    else a causal LM, else the bare model; on the ``meta`` device unless ``meta=False``.
    ``causal_lm``: only a causal LM will do (the benchmark trains one)."""
    import transformers

    source = config if isinstance(config, (str, Path)) else None
    if source is not None:
        config = load_hf_config(source)
    where = f" from {source}" if source is not None else ""
    archs = [] if causal_lm else getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    autos = [transformers.AutoModelForCausalLM] if causal_lm else [transformers.AutoModelForCausalLM, transformers.AutoModel]
    with torch.device("meta") if meta else torch.device("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if cls is not None:
                return cls(config)
            for auto in autos:
                try:
                    return auto.from_config(config)
                except ValueError as e:
                    if "Unrecognized configuration class" not in str(e):
                        raise
        except (ValueError, TypeError, AssertionError, RuntimeError) as e:  # e.g. heads that do not divide the width
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HFConfigError(f"transformers could not build a {config.model_type!r} model{where}: {message}") from None
    kind = "causal LM" if causal_lm else "model"
    raise HFConfigError(f"transformers has no {kind} class for model_type {config.model_type!r}")
