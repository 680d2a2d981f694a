"""flopmatch: which image-synthesis paradigm should you use for a fixed compute budget?"""

__version__ = "0.1.0"
PARADIGMS = ("diffusion", "masked", "autoregressive")
