"""pmptrain: neural-network training by Pontryagin's maximum principle."""

__version__ = "0.1.0"
