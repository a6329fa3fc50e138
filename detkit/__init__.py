"""detkit: train, evaluate, benchmark and deploy classic object detectors in pure PyTorch."""
__version__ = "0.1.0"
