"""Limits the readers enforce, kept free of numpy so that `swssl-infer --help` can show them without it."""

DEFAULT_MAX_PIXELS = 1 << 32  # per frame (height x width); larger frames are refused at open
