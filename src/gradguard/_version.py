"""The package version, in a module of its own so that code inside gradguard never imports the package root."""
__version__ = "0.1.0"
