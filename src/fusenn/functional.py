"""The functional API, mirroring torch.nn.functional where a twin exists."""

from fusenn.ops.dropout import dropout, dropout_mask

__all__ = ["dropout", "dropout_mask"]
