"""InputError: a problem with the files or flags a user gave, which the command line reports as one line
(`llava-ft: error: ...`, exit code 2) rather than a traceback. Light on purpose: the CLI imports it before any
heavy library."""

from __future__ import annotations

import errno
import os


class InputError(ValueError):
    """Raised with a message that names the file or flag and says what to do."""


class DiskFullError(InputError):
    """A write that found its file system full (ENOSPC) or over quota (EDQUOT): names the folder and the space."""


FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """Whether a write failed on a full disk: an OSError with ENOSPC/EDQUOT (possibly as the cause), or
    torch.save's RuntimeError, which carries only the system's message."""
    for error in (e, e.__cause__, e.__context__):
        if isinstance(error, OSError) and error.errno in FULL:
            return True
    return isinstance(e, RuntimeError) and any(os.strerror(code) in str(e) for code in FULL)


REMOTE_CODE_ADVICE = (
    "llava-ft runs no Python code shipped with a model; it loads the architectures transformers implements, and "
    "InternLM2 without its code"
)


def remote_code_refusal(folder: object, what: str) -> InputError:
    """The one-line refusal for a model folder whose `what` (config.json, tokenizer_config.json) names its own
    code (auto_map)."""
    return InputError(
        f"{folder}/{what}: this {('tokenizer' if 'tokenizer' in what else 'model')} needs its own Python code "
        f"(auto_map), refused: {REMOTE_CODE_ADVICE}; use a model of a transformers architecture"
    )
