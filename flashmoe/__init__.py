"""flashmoe: run Mixture-of-Experts models far larger than memory."""

__version__ = "0.1.0"
