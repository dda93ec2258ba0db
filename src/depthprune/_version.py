"""The package version, in a leaf module so that low-level code can record it without importing the package."""

__version__ = "0.2.0"
