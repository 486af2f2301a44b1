"""Drop-in nn.Modules."""

from fusenn.nn.attention import MultiheadAttention
from fusenn.nn.conv import ConvPool2d
from fusenn.nn.rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["ConvPool2d", "GRU", "GRUCell", "LSTM", "LSTMCell", "MultiheadAttention"]
