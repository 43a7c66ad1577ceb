"""Loading a model artifact's saved backbone weights into a freshly built network (every backbone family)."""
from __future__ import annotations

from artsim.errors import ArtsimError


def load_backbone_state(network, state: dict, model: str) -> None:
    """Load ``state`` strictly; weights that do not fit the architecture are an error naming the model."""
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtsimError(f"artifact backbone weights do not fit {model}: {str(exc)[:500]}") from None
