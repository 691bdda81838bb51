"""Where a cost belongs: every module declares its energy place, so the counter never guesses from names or order.

A place reads `block3.attention.scores`: the groups of the modules running an op, outer to inner, then one leaf.
The counter asks `resolve` with the modules that are running (outermost first) and the scopes that are open.

How a module or an op declares its place (plain attributes: the model never imports the counter's machinery):

    class SpikingMLP(nn.Module):
        energy_group = "mlp"     # a group: its place name is appended to the enclosing group's (block3.mlp)
        energy_own = "act"       # the leaf of ops the module runs itself (block3.mlp.act); without it, the group's

    class LIF(nn.Module):
        energy_place = "lif"     # a leaf under the enclosing group (block3.mlp.lif); the innermost leaf wins

    self.fc1.energy_place = "fc1"   # an instance may declare (or override) a place, e.g. in its parent's __init__

    with energy_scope("scores"):    # ops inside a forward, not a module of their own (attention's Q K^T)
        scores = q @ k.transpose(-1, -2)

    class SpikeEmbedding(nn.Module):
        energy_group, energy_sealed = "embedding", True   # everything below is charged to `embedding` itself

A new op (an attention-state decay, a normalisation, an event-driven engine's update) declares its place with a
scope around it in the forward that runs it, or is a module with `energy_place`; the counter prices it by its aten
ops wherever it runs. A fused kernel that holds two places (scaled_dot_product_attention) charges them to
`<group>.scores` and `<group>.values`. A model without any declaration keeps the innermost module's path
(`model` at the top), so any nn.Module can be counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_SCOPES: list[str] = []  # open energy_scope names, innermost last


@contextlib.contextmanager
def energy_scope(leaf: str) -> Iterator[None]:
    """Charge the ops run inside to `leaf` under the enclosing group (a module inside declares its own)."""
    _SCOPES.append(leaf)
    try:
        yield
    finally:
        _SCOPES.pop()


def open_scopes() -> int:
    """How many scopes are open now (the counter records it when a module starts)."""
    return len(_SCOPES)


def resolve(stack: list[tuple[str, nn.Module, int]], leaf: str | None = None) -> str:
    """The place of an op run now. `stack`: the running modules, outermost first, as (path, module, scopes open
    when it started); `leaf` overrides the innermost leaf (a fused kernel naming its parts)."""
    groups: list[str] = []
    current: str | None = None  # the innermost leaf declared under the innermost group
    declared = False
    scopes_seen = 0
    for _, module, scopes in stack:
        for scope in _SCOPES[scopes_seen:scopes]:  # scopes opened before this module started
            current = scope
        scopes_seen = max(scopes_seen, scopes)
        group = getattr(module, "energy_group", None)
        if group is not None:
            declared = True
            groups.append(group)
            current = getattr(module, "energy_own", None)
            if getattr(module, "energy_sealed", False):
                return ".".join(groups)
            continue
        place = getattr(module, "energy_place", None)
        if place is not None:
            current = place
    for scope in _SCOPES[scopes_seen:]:  # scopes opened inside the innermost module
        current = scope
    if leaf is not None:
        current = leaf
    if not declared:
        return stack[-1][0] if stack and stack[-1][0] else "model"
    return ".".join([*groups, current] if current else groups)
