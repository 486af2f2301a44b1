"""fusenn.patch / fusenn.unpatch: swap a model's torch layers for fusenn's twins in place, and back.

A twin takes over the original's Parameter objects themselves, not copies: an optimizer built before
patching keeps training the model, weight tying, requires_grad and accumulated .grad carry over, and
state_dict keys do not change. fusenn.MultiheadAttention and fusenn.ConvPool2d are looked up at call time,
so a build without them still patches the recurrent layers and says what it left. fusenn.LSTM and
fusenn.GRU are nn.RNNBase subclasses, not nn.LSTM / nn.GRU ones, so that torch.compile traces them with no
Dynamo setting (fusenn.nn.rnn says why): the report's notes name each swapped module where
isinstance(m, nn.LSTM) / isinstance(m, nn.GRU) no longer holds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

from torch import nn

import fusenn
from fusenn.nn import rnn

__all__ = ["PatchReport", "patch", "unpatch"]

# torch class -> (fusenn twin, the patch() flag that enables it)
_RNN_TWINS = {nn.LSTM: (rnn.LSTM, "lstm"), nn.LSTMCell: (rnn.LSTMCell, "lstm"),
              nn.GRU: (rnn.GRU, "gru"), nn.GRUCell: (rnn.GRUCell, "gru")}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
# Construction failures that mean "this configuration has no fused twin", reported rather than raised.
_UNSUPPORTED = (TypeError, ValueError, NotImplementedError)


@dataclasses.dataclass
class PatchReport:
    """What patch / unpatch did: `swapped` holds (qualified name, from type, to type), `left` holds
    (qualified name, type, reason), `notes` holds (qualified name, what a swapped module no longer answers as
    the original did). A Conv2d-activation-pool run is named after its conv."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.swapped)} swapped, {len(self.left)} left"]
        lines += [f"  swapped {name or '<model>'}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  left    {name or '<model>'} ({kind}): {reason}" for name, kind, reason in self.left]
        lines += [f"  note    {name or '<model>'}: {note}" for name, note in self.notes]
        return "\n".join(lines)


class _Unfused(NamedTuple):
    """The Sequential entries a ConvPool2d replaced, kept on it (as a plain attribute, so outside its
    state_dict and children) for unpatch to put back exactly."""

    activation_key: Optional[str]
    activation: Optional[nn.Module]
    pool_key: str
    pool: nn.Module


def patch(model: nn.Module, lstm: bool = True, gru: bool = True, attention: bool = True,
          conv_pool: bool = True) -> PatchReport:
    """Swap, in place, model's nn.LSTM / nn.LSTMCell (lstm), nn.GRU / nn.GRUCell (gru),
    nn.MultiheadAttention (attention) and nn.Sequential runs Conv2d -> [activation] -> MaxPool2d/AvgPool2d
    (conv_pool) for fusenn's modules. Only those exact classes: a subclass may override forward, so it
    is left alone, as is a module with hooks (the twin would not run them). Patch before wrapping the
    model in DistributedDataParallel or torch.compile."""
    enabled = {"lstm": lstm, "gru": gru, "attention": attention}
    report = PatchReport()
    if type(model) in _RNN_TWINS or type(model) is nn.MultiheadAttention:
        report.left.append(("", _type_name(type(model)), "the model itself cannot be swapped in place: "
                                                          "convert it with fusenn's from_torch"))

    def convert(module: nn.Module, name: str) -> Optional[nn.Module]:
        cls = type(module)
        if isinstance(module, _fusenn_types()):
            return _leave(report, name, module, "already fusenn")
        if cls in _RNN_TWINS:
            twin_cls, flag = _RNN_TWINS[cls]
        elif cls is nn.MultiheadAttention:
            twin_cls, flag = getattr(fusenn, "MultiheadAttention", None), "attention"
        else:
            base = next((t for t in (*_RNN_TWINS, nn.MultiheadAttention) if isinstance(module, t)), None)
            if base is not None:
                _leave(report, name, module, f"subclass of {_type_name(base)} (its forward may differ): left alone")
            return None
        if not enabled[flag]:
            return _leave(report, name, module, f"disabled by {flag}=False")
        if twin_cls is None:
            return _leave(report, name, module, "fusenn.MultiheadAttention unavailable")
        if _has_hooks(module):
            return _leave(report, name, module, "has hooks, which its twin would not run: left alone")
        try:
            if hasattr(twin_cls, "from_torch"):
                twin = twin_cls.from_torch(module)
            else:
                twin = _empty_twin(twin_cls, _attention_config(module), module)
            _adopt_parameters(twin, module)
        except _UNSUPPORTED as e:
            return _leave(report, name, module, str(e))
        report.swapped.append((name, _type_name(cls), _type_name(twin_cls)))
        if cls in (nn.LSTM, nn.GRU):
            report.notes.append((name, _not_a_subclass(cls)))
        return twin

    def restructure(seq: nn.Sequential, prefix: str) -> list[nn.Module]:
        reason = None
        if not conv_pool:
            reason = "disabled by conv_pool=False"
        elif type(seq) is not nn.Sequential:
            reason = f"inside {_type_name(type(seq))}, a subclass of nn.Sequential (its forward may differ): left alone"
        return _fuse_conv_runs(seq, prefix, report, reason)

    _walk(model, convert, restructure)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo patch in place: fusenn's LSTM, GRU, cells and MultiheadAttention become their torch.nn
    classes again, and each ConvPool2d that patch made becomes its Conv2d, activation and pool under
    their old keys. Parameters are kept as objects, as in patch."""
    report = PatchReport()
    torch_of = {twin: cls for cls, (twin, _) in _RNN_TWINS.items()}
    if type(model) in torch_of or type(model) is getattr(fusenn, "MultiheadAttention", None):
        report.left.append(("", _type_name(type(model)), "the model itself cannot be swapped in place: "
                                                          "convert it with its to_torch()"))

    def convert(module: nn.Module, name: str) -> Optional[nn.Module]:
        cls = type(module)
        attention_cls = getattr(fusenn, "MultiheadAttention", None)
        if cls is getattr(fusenn, "ConvPool2d", None):
            if isinstance(getattr(module, "_fusenn_unfused", None), _Unfused):
                return _leave(report, name, module, "its conv, activation and pool can only be put back "
                                                    "inside an nn.Sequential")
            return _leave(report, name, module, "built directly, not by fusenn.patch: no torch modules to restore")
        if cls not in torch_of and cls is not attention_cls:
            if isinstance(module, _fusenn_types()):
                _leave(report, name, module, "subclass of a fusenn module (its forward may differ): left alone")
            return None
        if _has_hooks(module):
            return _leave(report, name, module, "has hooks, which its torch twin would not run: left alone")
        if hasattr(module, "to_torch"):
            twin = module.to_torch()
        else:
            twin = _empty_twin(nn.MultiheadAttention, _attention_config(module), module)
        _adopt_parameters(twin, module)
        report.swapped.append((name, _type_name(cls), _type_name(type(twin))))
        return twin

    def restructure(seq: nn.Sequential, prefix: str) -> list[nn.Module]:
        return _unfuse_conv_runs(seq, prefix, report)

    _walk(model, convert, restructure)
    return report


def _walk(root: nn.Module, convert: Callable[[nn.Module, str], Optional[nn.Module]],
          restructure: Callable[[nn.Sequential, str], list[nn.Module]]) -> None:
    """Depth first over root's submodules. Each distinct module is converted once (None: keep it and
    descend) and its replacement set wherever it is registered, so shared modules stay shared.
    restructure rewrites a Sequential's entries first and returns the modules it already dealt with."""
    # id(module) -> (module, what it became). Holding the module keeps its id from being reused by a
    # module created later in the walk once the tree no longer refers to it.
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.Sequential):
            done.update((id(m), (m, m)) for m in restructure(module, prefix))
        for key, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = (child, child)
                twin = convert(child, prefix + key)
                if twin is None:
                    visit(child, f"{prefix}{key}.")
                else:
                    done[id(child)] = (child, twin)
            new = done[id(child)][1]
            if new is not child:
                setattr(module, key, new)

    visit(root, "")


def _fuse_conv_runs(seq: nn.Sequential, prefix: str, report: PatchReport, leave: Optional[str]) -> list[nn.Module]:
    """Replace each run Conv2d -> [activation] -> pool among seq's entries by one ConvPool2d under the
    conv's key; the activation's and pool's keys go, so the state_dict keys stay as they were. With
    `leave` set, runs are only reported as left, for that reason."""
    conv_pool = getattr(fusenn, "ConvPool2d", None)
    items = list(seq._modules.items())
    kept, fused_modules = [], []
    i = 0
    while i < len(items):
        run = _conv_run(items, i)
        if run is None:
            kept.append(items[i])
            i += 1
            continue
        i += len(run)
        (conv_key, conv), *middle, (pool_key, pool) = run
        activation_key, activation = middle[0] if middle else (None, None)
        name = prefix + conv_key
        kind = "+".join(_type_name(type(m)) for _, m in run)
        reason = leave
        if reason is None and conv_pool is None:
            reason = "fusenn.ConvPool2d unavailable"
        if reason is None and any(_has_hooks(m) for _, m in run):
            reason = "has hooks, which the fused module would not run: left alone"
        if reason is None:
            try:
                fused = conv_pool.from_modules(conv, activation, pool)
                _adopt_parameters(fused, conv)
            except _UNSUPPORTED as e:
                reason = str(e)
        if reason is not None:
            report.left.append((name, kind, reason))
            kept.extend(run)
            continue
        fused.train(conv.training)
        fused._fusenn_unfused = _Unfused(activation_key, activation, pool_key, pool)
        kept.append((conv_key, fused))
        fused_modules.append(fused)
        report.swapped.append((name, kind, _type_name(conv_pool)))
    if fused_modules:
        _set_entries(seq, kept)
    return fused_modules


def _conv_run(items: list[tuple[str, nn.Module]], i: int) -> Optional[list[tuple[str, nn.Module]]]:
    """The entries from i that form Conv2d -> [activation] -> MaxPool2d/AvgPool2d (exact torch classes), or None."""
    if type(items[i][1]) is not nn.Conv2d:
        return None
    j = i + 1
    if j < len(items) and _is_activation(items[j][1]):
        j += 1
    if j < len(items) and type(items[j][1]) in _POOLS:
        return items[i:j + 1]
    return None


def _is_activation(module: nn.Module) -> bool:
    """torch's own activation modules (from_modules says which it fuses) and nn.Identity."""
    return type(module).__module__ == nn.modules.activation.__name__ or type(module) is nn.Identity


def _unfuse_conv_runs(seq: nn.Sequential, prefix: str, report: PatchReport) -> list[nn.Module]:
    """Put back the Conv2d, activation and pool of each ConvPool2d that patch made in seq, under their old
    keys; the conv is rebuilt around the fused module's parameters, which may have trained since."""
    conv_pool = getattr(fusenn, "ConvPool2d", None)
    items = list(seq._modules.items())
    keys = set(seq._modules)
    entries, handled = [], []
    for key, module in items:
        unfused = getattr(module, "_fusenn_unfused", None)
        if conv_pool is None or type(module) is not conv_pool or not isinstance(unfused, _Unfused):
            entries.append((key, module))
            continue
        handled.append(module)
        restored = [(unfused.activation_key, unfused.activation)] if unfused.activation is not None else []
        restored.append((unfused.pool_key, unfused.pool))
        taken = [k for k, _ in restored if k in keys]
        if taken:
            report.left.append((prefix + key, _type_name(conv_pool),
                                f"keys {', '.join(taken)} are taken in the Sequential since patch"))
            entries.append((key, module))
            continue
        conv = _empty_twin(nn.Conv2d, _conv_config(module), module)
        _adopt_parameters(conv, module)
        for _, m in restored:
            m.train(module.training)
        entries += [(key, conv), *restored]
        handled += [conv, *(m for _, m in restored)]
        keys.update(k for k, _ in restored)
        report.swapped.append((prefix + key, _type_name(conv_pool),
                               "+".join(_type_name(type(m)) for _, m in [(key, conv), *restored])))
    if len(entries) != len(items):
        _set_entries(seq, entries)
    return handled


def _set_entries(seq: nn.Sequential, entries: list[tuple[str, nn.Module]]) -> None:
    seq._modules.clear()
    seq._modules.update(entries)


def _attention_config(mha: nn.MultiheadAttention) -> dict:
    return dict(embed_dim=mha.embed_dim, num_heads=mha.num_heads, dropout=mha.dropout,
                bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first)


def _conv_config(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _empty_twin(cls: type, config: dict, module: nn.Module) -> nn.Module:
    """cls(**config) on the meta device: no init work or memory, as _adopt_parameters fills it."""
    return cls(**config, device="meta", dtype=next(module.parameters()).dtype).train(module.training)


def _adopt_parameters(twin: nn.Module, original: nn.Module) -> None:
    """Register original's Parameter objects in twin under the same names, replacing twin's own."""
    theirs = dict(original.named_parameters(remove_duplicate=False))
    mine = dict(twin.named_parameters(remove_duplicate=False))
    if mine.keys() != theirs.keys() or any(mine[n].shape != p.shape for n, p in theirs.items()):
        raise TypeError(f"{_type_name(type(twin))} does not hold the parameters of {_type_name(type(original))}: "
                        f"{sorted(mine)} vs {sorted(theirs)}")
    for name, param in theirs.items():
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner), leaf, param)  # RNNBase.__setattr__ keeps _flat_weights in step
    if any(t.is_meta for t in twin.buffers()):
        raise TypeError(f"{_type_name(type(twin))} has buffers that {_type_name(type(original))} lacks")
    if isinstance(twin, nn.RNNBase):
        twin.flatten_parameters()  # cuDNN wants the weights in one buffer again (no-op on CPU)


def _not_a_subclass(cls: type) -> str:
    """What changes for code that tests the type of a swapped nn.LSTM / nn.GRU (fusenn.nn.rnn says why)."""
    return (f"fusenn.{cls.__name__} is an nn.RNNBase with mode '{cls.__name__}', not an nn.{cls.__name__} "
            f"subclass (so torch.compile traces it with no Dynamo setting): isinstance(m, nn.{cls.__name__}) is "
            f"False here now; isinstance(m, nn.RNNBase) and m.mode == '{cls.__name__}' hold")


def _fusenn_types() -> tuple[type, ...]:
    late = (getattr(fusenn, "MultiheadAttention", None), getattr(fusenn, "ConvPool2d", None))
    return tuple(twin for twin, _ in _RNN_TWINS.values()) + tuple(t for t in late if t is not None)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _leave(report: PatchReport, name: str, module: nn.Module, reason: str) -> None:
    report.left.append((name, _type_name(type(module)), reason))
    return None


def _type_name(cls: type) -> str:
    if cls.__module__.startswith("torch.nn."):
        return f"nn.{cls.__name__}"
    if cls.__module__.startswith("fusenn."):
        return f"fusenn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"
