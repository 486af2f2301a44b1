"""ConvPool2d: nn.Sequential(nn.Conv2d, activation, nn.MaxPool2d / nn.AvgPool2d) as one module and one kernel."""

from __future__ import annotations

from torch import Tensor, nn

from fusenn.ops import conv_pool as ops
from fusenn.reference.conv_pool import ACTIVATIONS, POOLS

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                       nn.Tanh: "tanh", nn.Identity: "none"}


class ConvPool2d(nn.Conv2d):
    """A 2-D convolution followed by an activation and max or average pooling.

    It is an nn.Conv2d (same arguments, parameters `weight` and `bias`, same init, so a seed gives the
    same weights and state_dicts move both ways) whose forward also applies the activation ('none',
    'relu', 'leaky_relu' with `negative_slope`, 'gelu', 'gelu_tanh', 'silu', 'sigmoid', 'tanh') and the
    pooling of nn.MaxPool2d / nn.AvgPool2d (`pool_*`, `ceil_mode`, `count_include_pad` as there).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", activation: str = "relu",
                 pool: str = "max", pool_kernel_size=2, pool_stride=None, pool_padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, negative_slope: float = 0.01, device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"fusenn: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if pool not in POOLS:
            raise ValueError(f"fusenn: unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope
        self.pool = pool
        self.pool_kernel_size = pool_kernel_size
        self.pool_stride = pool_stride if pool_stride is not None else pool_kernel_size
        self.pool_padding = pool_padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, activation: nn.Module | None, pool: nn.Module) -> "ConvPool2d":
        """The fused twin of nn.Sequential(conv, activation, pool), with a copy of conv's parameters."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"fusenn: from_modules needs an nn.Conv2d, got {type(conv).__name__}")
        slope = 0.01
        if activation is None:
            name = "none"
        elif isinstance(activation, nn.GELU):
            name = "gelu_tanh" if activation.approximate == "tanh" else "gelu"
        elif type(activation) in _ACTIVATION_MODULES:
            name = _ACTIVATION_MODULES[type(activation)]
            slope = getattr(activation, "negative_slope", slope)
        else:
            raise TypeError(f"fusenn: no fused activation for {type(activation).__name__}; supported: "
                            f"{', '.join(t.__name__ for t in _ACTIVATION_MODULES)}, GELU, None")
        if isinstance(pool, nn.MaxPool2d):
            if pool.dilation not in (1, (1, 1)) or pool.return_indices:
                raise ValueError("fusenn: ConvPool2d takes MaxPool2d without dilation or return_indices")
            options = dict(pool="max")
        elif isinstance(pool, nn.AvgPool2d):
            if pool.divisor_override is not None:
                raise ValueError("fusenn: ConvPool2d takes AvgPool2d without divisor_override")
            options = dict(pool="avg", count_include_pad=pool.count_include_pad)
        else:
            raise TypeError(f"fusenn: from_modules needs nn.MaxPool2d or nn.AvgPool2d, got {type(pool).__name__}")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, activation=name, negative_slope=slope,
                    pool_kernel_size=pool.kernel_size, pool_stride=pool.stride, pool_padding=pool.padding,
                    ceil_mode=pool.ceil_mode, device=conv.weight.device, dtype=conv.weight.dtype, **options)
        fused.load_state_dict(conv.state_dict())
        return fused

    def forward(self, input: Tensor) -> Tensor:  # nn.Conv2d's argument name, so conv(input=x) works too
        explicit = self.padding_mode != "zeros" or isinstance(self.padding, str)
        return ops.conv_pool2d(
            input, self.weight, self.bias, self.stride,
            list(self._reversed_padding_repeated_twice) if explicit else self.padding, self.dilation, self.groups,
            self.padding_mode, self.activation, self.negative_slope, self.pool, self.pool_kernel_size,
            self.pool_stride, self.pool_padding, self.ceil_mode, self.count_include_pad)

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        s += f", pool={self.pool}, pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}"
        if self.pool_padding:
            s += f", pool_padding={self.pool_padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if self.pool == "avg" and not self.count_include_pad:
            s += ", count_include_pad=False"
        return s
