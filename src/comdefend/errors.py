"""Errors meant for the user: the CLI prints their message and exits non-zero, no traceback."""

from __future__ import annotations


class ComDefendError(Exception):
    """Base class of every error whose message is written for the user."""

    exit_code = 1


class UsageError(ComDefendError, ValueError):
    """Bad argument: unknown name, value out of range, incompatible options."""

    exit_code = 2


class InputError(ComDefendError, ValueError):
    """Bad input data: unreadable image, wrong channel count, NaN/inf values."""


class CheckpointError(ComDefendError):
    """A file that is not a checkpoint we can load, or one of another architecture."""


class DatasetNotFoundError(ComDefendError, FileNotFoundError):
    """A dataset could not be found where we looked."""
