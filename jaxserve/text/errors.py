"""Errors of the text layer."""
from __future__ import annotations

from jaxserve.config import ConfigError


class TokenizerError(ConfigError):
    """A tokenizer we cannot build; the message names the file and the field."""
