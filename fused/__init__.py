"""tether-fused and the tether CLI."""
__version__ = "0.1.0"
