"""One forward and backward pass of a LanguageModel on fixed tokens (the tests that compare a
model switch's numbers with the model without it)."""

import torch


def loss_and_grads(cfg, state=None):
    """(model, per-token loss, {parameter name: gradient}); `state` loaded first if given."""
    from medmoe_mcore.models.language import LanguageModel

    model = LanguageModel(cfg)
    if state is not None:
        model.load_state_dict(state)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).unsqueeze(0).expand(2, -1)
    loss = model(tokens, positions, None, labels=tokens)
    loss.float().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads
