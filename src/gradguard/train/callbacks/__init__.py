"""The Trainer's callbacks: the loop dispatches hooks, each optional behaviour lives in one file here."""
from .base import TrainCallback

__all__ = ["TrainCallback"]
