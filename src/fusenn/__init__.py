"""fusenn: fused Triton and CUDA C++ kernels for classic deep-learning layers, as drop-in PyTorch modules."""

from fusenn import functional
from fusenn.dispatch import BackendError, backends, get_backend, set_backend
from fusenn.nn import GRU, LSTM, GRUCell, LSTMCell
from fusenn.nn.attention import MultiheadAttention
from fusenn.nn.conv import ConvPool2d
from fusenn.patch import patch, unpatch

__version__ = "0.1.0"

__all__ = ["BackendError", "ConvPool2d", "GRU", "GRUCell", "LSTM", "LSTMCell", "MultiheadAttention", "backends",
           "functional", "get_backend", "patch", "set_backend", "unpatch", "__version__"]
