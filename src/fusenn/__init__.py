"""fusenn: fused Triton and CUDA C++ kernels for classic deep-learning layers, as drop-in PyTorch modules."""

from fusenn import functional
from fusenn.dispatch import BackendError, backends, get_backend, set_backend
from fusenn.nn import GRU, LSTM, GRUCell, LSTMCell

__version__ = "0.1.0"

__all__ = ["BackendError", "GRU", "GRUCell", "LSTM", "LSTMCell", "backends", "functional", "get_backend", "set_backend",
           "__version__"]
