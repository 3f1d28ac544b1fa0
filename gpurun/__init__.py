"""gpurun: rent GPU machines for training runs and give them back safely."""

__version__ = "0.1.0"
