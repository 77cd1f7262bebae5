"""The package version: the single source, read by ``setup.py`` (without importing the package) and exported
as ``visionpeft.__version__``."""

__version__ = "0.1.0"
