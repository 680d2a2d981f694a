"""flopmatch: which image-synthesis paradigm should you use for a fixed compute budget?"""

__version__ = "0.2.0"
PARADIGMS = ("diffusion", "masked", "autoregressive")
