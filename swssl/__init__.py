"""SWSSL: sliding-window self-supervised anomaly detection for very large images."""
__version__ = "0.1.0"
