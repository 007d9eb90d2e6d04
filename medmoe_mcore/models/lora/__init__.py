"""LoRA in the model room: the adapter beside a parallel linear and the linears that carry it
as layer-spec entries."""
