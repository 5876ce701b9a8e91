"""TRELLIS training framework: the TRELLIS model family, trainable anywhere."""

__version__ = "0.1.0"
