"""One exception type for bad user input.

Anything raised as ``UserError`` reaches the user as a single line on stderr
(``error: <message>``) with exit status 2, never as a traceback. The message
must name the problem and the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the command line or a config: shown as one line, no traceback."""


def one_line_config_error(error: BaseException, prefix: str = "") -> UserError:
    """An OmegaConf or Hydra composition error as one UserError line naming the option, the
    value and what was expected (OmegaConf messages carry the key on a second line)."""
    cause = error
    while cause.__cause__ is not None and not hasattr(cause, "full_key"):
        cause = cause.__cause__
    message = str(getattr(cause, "msg", None) or cause).splitlines()[0].strip()
    key = getattr(cause, "full_key", None)
    if key and prefix and not key.startswith(prefix + "."):
        key = f"{prefix}.{key}"
    if key:
        if "not in" in message or "not in struct" in message:
            import dataclasses

            owner = getattr(cause, "object_type", None)
            if dataclasses.is_dataclass(owner):
                valid = ", ".join(sorted(f.name for f in dataclasses.fields(owner) if f.name != "name")) or "none"
                return UserError(f"unknown option {key}; valid: {valid}")
            return UserError(f"unknown option {key}; check the spelling (python -m meta_llr.train --cfg job lists every option)")
        value = getattr(cause, "value", None)
        expected = message.split(" to ")[-1] if "could not be converted to" in message else message
        shown = f"={value}" if value is not None else ""
        return UserError(f"{key}{shown} has the wrong type; expected {expected.rstrip('.')}")
    return UserError(f"bad config: {message}")


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after checkpointing and recording ``status: interrupted``;
    the command exits with ``exit_code`` (128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
