"""The edgec error hierarchy.

Every error a user can cause is an ``EdgecError``. The CLI prints it as one line and exits with
the subclass's ``exit_code``; library callers catch the subclass they care about.
"""

from __future__ import annotations


class EdgecError(Exception):
    """Base of every error edgec raises on purpose."""

    exit_code = 1


class SourceError(EdgecError):
    """A model source (name, directory, file) is missing, unknown or unreadable."""

    exit_code = 2


class RecipeError(EdgecError):
    """A compression recipe has an unknown key or a value out of range."""

    exit_code = 3


class ExportError(EdgecError):
    """Export failed, including parity between onnxruntime and torch above tolerance."""

    exit_code = 4


class PackageError(EdgecError):
    """A package is missing, corrupted, of an unknown format version, or escapes its folder."""

    exit_code = 5


class InputError(EdgecError):
    """Inputs given to a runtime do not match the package: name, dtype or shape."""

    exit_code = 6


class FidelityError(EdgecError):
    """A compressed model fell below the fidelity floor its recipe states."""

    exit_code = 7


class DeviceError(EdgecError):
    """A device profile is invalid, a plan does not fit, or a device is unreachable."""

    exit_code = 8


class ServerError(EdgecError):
    """The inference server cannot start with the options given."""

    exit_code = 9


class SignatureError(PackageError):
    """A package signature is missing, malformed or does not verify."""

    exit_code = 10


class SecretsError(DeviceError):
    """Cluster secrets (token, CA, device certificates) are missing, malformed, not private
    (mode 0600, directories 0700), or name no such device. Exits as a ``DeviceError``."""


class FederatedError(EdgecError):
    """A federated run cannot start or go on: options, checkpoint, data, devices or an update."""

    exit_code = 11
