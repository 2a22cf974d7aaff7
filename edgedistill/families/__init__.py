"""Model-family knowledge: student derivation, inputs, export specifics. The pipeline asks `family_for(config)`."""
from __future__ import annotations

from edgedistill.errors import CheckpointError
from edgedistill.families.causal_lm import CAUSAL_LM_TYPES
from edgedistill.families.text_encoder import TEXT_ENCODER_TYPES, TextEncoderFamily


def family_for(config) -> TextEncoderFamily:
    """Return the family that knows this transformers config, or raise CheckpointError."""
    model_type = getattr(config, "model_type", None)
    if model_type in TEXT_ENCODER_TYPES:
        return TextEncoderFamily(TEXT_ENCODER_TYPES[model_type])
    raise CheckpointError(
        f"unsupported architecture '{model_type}'",
        hint=f"edgedistill compiles text encoders of types {', '.join(sorted(TEXT_ENCODER_TYPES))} and causal LMs of "
             f"types {', '.join(sorted(CAUSAL_LM_TYPES))}",
    )
