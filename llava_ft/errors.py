"""InputError: a problem with the files or flags a user gave, which the command line reports as one line
(`llava-ft: error: ...`, exit code 2) rather than a traceback. Light on purpose: the CLI imports it before any
heavy library."""

from __future__ import annotations

import errno


class InputError(ValueError):
    """Raised with a message that names the file or flag and says what to do."""


class DiskFullError(InputError):
    """A write that found its file system full (ENOSPC) or over quota (EDQUOT): names the folder and the space."""


FULL = (errno.ENOSPC, errno.EDQUOT)


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
