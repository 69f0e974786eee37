"""The path arguments of `tierzero ckpt` and `tierzero report`, checked before they are used.

A URL is held to the rule checkpoint.dir and telemetry.dir follow (config.location_errors), before
any I/O: `ftp://host/x` would otherwise make fsspec look the host up and connect. A file, or a
path that is not there, where a folder is expected is named as such -- not listed as a folder with
no checkpoints, nor read as a step whose COMMITTED marker "cannot be read: Not a directory".
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# The key whose rule a CLI argument is held to; every location key shares it (LOCATION_KEYS).
_RULE_KEY = ("checkpoint", "dir")


@dataclasses.dataclass(frozen=True)
class Folder:
    """What a path argument must name, in the words of its messages."""

    what: str
    """e.g. "checkpoints folder"."""
    example: str
    """One the user could give, e.g. "runs/NAME/checkpoints"."""
    hint: str = ""
    """Said after the fix, e.g. where to find a right one."""


CHECKPOINTS = Folder("checkpoints folder", "runs/NAME/checkpoints")
STEP = Folder("checkpoint step folder", "runs/NAME/checkpoints/step-00000010",
              "`tierzero ckpt list DIR` shows the checkpoints of a folder")
STEP_OR_CHECKPOINTS = Folder("checkpoint folder", "runs/NAME/checkpoints/step-00000010 (or runs/NAME/checkpoints "
                             "for its newest committed step)",
                             "`tierzero ckpt list DIR` shows the checkpoints of a folder")
DCP = Folder("DCP checkpoint folder", "dcp-100 (what torch.distributed.checkpoint.save wrote: it holds .metadata)")
RUN = Folder("run folder", "runs/NAME (the folder a run wrote: it holds config.yaml)")


def location_problem(location: str) -> Optional[str]:
    """Why tierzero cannot use the URL `location` (an unsupported protocol, a chained URL, s3://
    without s3fs), naming it and what is supported; None for a local path or a usable URL. The
    verdict of config.location_errors -- one rule for config keys and CLI arguments -- without the
    dotted key, which a CLI argument does not have. Pure: no backend imported, no connection."""
    from tierzero.launcher.config import RunConfig, location_errors

    section, name = _RULE_KEY
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: location})})
    problem = location_errors(cfg).get(f"{section}.{name}")
    return problem.removeprefix(f"{section}.{name}=") if problem else None


def folder_problem(location: str, folder: Folder) -> Optional[str]:
    """Why `location` is not a folder to read (it is a file, something else, or not there); None
    when it is a folder. Reads the filesystem: call location_problem first."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    if fs.isdir(path):
        return None
    hint = f"; {folder.hint}" if folder.hint else ""
    if fs.isfile(path):
        return f"{location} is a file, not a {folder.what}; give a folder such as {folder.example}{hint}"
    if fs.lexists(path):  # a FIFO, a socket, a dangling link
        return f"{location} is not a folder, so not a {folder.what}; give a folder such as {folder.example}{hint}"
    return f"{location} does not exist; give a {folder.what} such as {folder.example}{hint}"
