"""The functional API, mirroring torch.nn.functional where a twin exists."""

from fusenn.ops.attention import scaled_dot_product_attention
from fusenn.ops.conv_pool import conv_pool2d
from fusenn.ops.dropout import dropout, dropout_mask

__all__ = ["conv_pool2d", "dropout", "dropout_mask", "scaled_dot_product_attention"]
