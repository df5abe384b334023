"""Small models in plain PyTorch used by the CLI, the benchmark and the tests."""

from .gpt import GPT, GPTConfig, PRESETS, build_model

__all__ = ["GPT", "GPTConfig", "PRESETS", "build_model"]
