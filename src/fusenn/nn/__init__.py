"""Drop-in nn.Modules."""

from fusenn.nn.rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["GRU", "LSTM", "GRUCell", "LSTMCell"]
