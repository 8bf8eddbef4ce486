"""The study layer: a :class:`Study` is the handle every command takes (``Study.open(path)``,
``Study.create(options)``); :func:`launch` and :func:`resume` run one to its end."""

from study.launcher import launch, resume
from study.study import Study, StudyError, StudyOptions

__all__ = ["Study", "StudyError", "StudyOptions", "launch", "resume"]
