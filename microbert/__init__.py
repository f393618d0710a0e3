"""MicroBERT: pre-train small BERT masked-language models and serve fill-mask predictions."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("microbert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
