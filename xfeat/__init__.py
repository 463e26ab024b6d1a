"""xfeat: visual quality control with pretrained CNN features."""

__version__ = "0.1.0"
