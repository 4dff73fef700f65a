"""Moved: frozen pretrained encoders are loaded by `lsd.convert.encoders` (the registry is
`lsd.convert.encoder_specs`). This shim keeps old imports working until every call site uses
the new module; it is removed with the last one."""

from lsd.convert.encoders import FrozenEncoder, frozen_encoder, hidden_states

FROZEN_ENCODERS = ("minilm",)

__all__ = ["FROZEN_ENCODERS", "FrozenEncoder", "frozen_encoder", "hidden_states"]
