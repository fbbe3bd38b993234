"""Typed errors for users: each message says what is wrong and what to do about it."""


class DftError(Exception):
    """Base class for errors the CLI reports as one clean message (no traceback)."""


class ConfigError(DftError):
    """A job configuration that cannot be used."""


class DataError(DftError):
    """Input data that cannot be read; the message names the file and line."""


class LaunchError(DftError):
    """The processes were launched in a way the job cannot run correctly under."""


class CheckpointError(DftError):
    """A checkpoint that is missing, incomplete or incompatible."""


class Preempted(DftError):
    """The job was asked to stop (SIGTERM / pre-emption) and saved a checkpoint to resume from."""
