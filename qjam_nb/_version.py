"""The release, in one place (the ssh payload names its remote directory after it)."""

__version__ = "0.1.0"
