"""fusenn: fused Triton and CUDA C++ kernels for classic deep-learning layers, as drop-in PyTorch modules."""

from fusenn import functional
from fusenn.dispatch import BackendError, backends, get_backend, set_backend, set_logging
from fusenn.nn import GRU, LSTM, ConvPool2d, GRUCell, LSTMCell, MultiheadAttention
from fusenn.patch import PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = ["BackendError", "ConvPool2d", "GRU", "GRUCell", "LSTM", "LSTMCell", "MultiheadAttention", "PatchReport",
           "backends", "functional", "get_backend", "patch", "set_backend", "set_logging", "unpatch",
           "__version__"]
