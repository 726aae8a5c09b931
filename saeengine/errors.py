"""The errors saeengine raises on purpose. Each message names the problem and the fix.

Every class derives from :class:`SAEEngineError`, so the command line can print it as one
line (``--debug`` shows the traceback), and from the builtin that a caller would have
caught before (``ValueError`` for bad values, ``OSError`` for a full disk), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class SAEEngineError(Exception):
    """Base of every deliberate saeengine error: a clear message, no traceback needed."""


class ConfigError(SAEEngineError, ValueError):
    """A config field holds a value outside its allowed range; the message names the field."""


class NonFiniteError(SAEEngineError, ValueError):
    """NaN or inf where finite numbers are required (activations, statistics, the loss)."""


class DataMismatchError(SAEEngineError, ValueError):
    """A run folder, checkpoint or store belongs to other data than the one given."""


class CheckpointError(SAEEngineError, ValueError):
    """A checkpoint file is missing, truncated, corrupted or inconsistent; the message names it."""


class StoreError(SAEEngineError, RuntimeError):
    """A store on disk is missing, damaged or does not match its metadata."""


class StoreIncompleteError(StoreError):
    """The writer of this store did not finish (killed, or still running)."""


class StoreCorruptError(StoreError):
    """A store's bytes do not match their recorded checksum or metadata."""


class InputError(SAEEngineError, ValueError):
    """An input file (an image, a file list) cannot be read; the message names the file."""


class LockedError(SAEEngineError, RuntimeError):
    """Another process is writing the same store or run folder; the message names it."""


class DiskFullError(SAEEngineError, OSError):
    """The disk filled up while writing; nothing half-written was left under a real name."""


class DataError(SAEEngineError, ValueError):
    """Data that cannot serve as given: too few rows, or no spread to normalize by."""
