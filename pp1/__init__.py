"""pp1-server: a front rank (stage 0) plus a tensor-parallel mesh, served as one torchrun job."""

__version__ = "0.1.0"
