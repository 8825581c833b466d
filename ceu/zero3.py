"""The LM head under DeepSpeed ZeRO-3, for the fused losses.

ZeRO-3 keeps each parameter partitioned (``.data`` empty) except inside its own module's forward and backward. The
fused losses read the head's weight outside the head's forward, so they see an empty tensor. :func:`gathered_lm_head`
puts a stand-in head in the model for the duration of a loss: its weight and bias are full copies gathered from the
ranks, differentiable, whose gradient goes back to the partitioned parameter with the parameter gathered again, as
ZeRO's own gradient hooks expect (they reduce-scatter it). Nothing changes for a model ZeRO-3 does not partition.
After training, :func:`release` turns the model back into an ordinary one for evaluation and saving.
"""
import contextlib
import sys

import torch

from ceu.heads import causal_lm


def is_zero3_parameter(tensor) -> bool:
    """Whether ``tensor`` is a parameter partitioned by DeepSpeed ZeRO-3 (it then carries a ``ds_id``)."""
    return isinstance(tensor, torch.nn.Parameter) and hasattr(tensor, "ds_id")


def unwrap_engine(model):
    """The module inside a ``deepspeed.DeepSpeedEngine`` (the model Trainer hands to ``compute_loss`` under
    DeepSpeed); any other model as is. DeepSpeed is looked up only if it is already imported."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


class _GatheredCopy(torch.autograd.Function):
    """A full copy of a ZeRO-3 parameter (called while the parameter is gathered, so autograd records its full
    shape). The backward gathers the parameter again, if no module holds it, so that its gradient can be accumulated
    and ZeRO's post-accumulation hook reduce it; the parameter is then partitioned again."""

    @staticmethod
    def forward(ctx, param):
        ctx.param = param
        return param.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        param = ctx.param
        if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            param.all_gather(param_list=[param])

            def release(_):
                handle.remove()
                if not param.ds_active_sub_modules:  # a tied embedding still in its backward releases it itself
                    param.partition(param_list=[param])

            handle = param.register_post_accumulate_grad_hook(release)
        return grad


def _gathered_copy(param: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return _GatheredCopy.apply(param)


class _GatheredHead(torch.nn.Linear):
    """Stand-in for a ZeRO-3 partitioned ``nn.Linear`` head: plain tensor attributes ``weight``/``bias`` holding
    gathered copies (so it holds no parameters of its own)."""

    def __init__(self, head: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = _gathered_copy(head.weight)
        self.bias = None if head.bias is None else _gathered_copy(head.bias)


@contextlib.contextmanager
def gathered_lm_head(model):
    """Within this block the model's LM head has its full weight (and bias) where ZeRO-3 partitions them; elsewhere
    a no-op. Wrap the forward of a fused loss in it; the backward may run after the block. Costs one gathered copy
    of the head per block, kept until the backward."""
    lm = causal_lm(unwrap_engine(model))
    head = lm.get_output_embeddings()
    if not is_zero3_parameter(getattr(head, "weight", None)):
        yield
        return
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the LM head is a {type(head).__name__}, not torch.nn.Linear: the fused losses need its "
                        "plain weight")
    lm.set_output_embeddings(_GatheredHead(head))
    try:
        yield
    finally:
        lm.set_output_embeddings(head)


def release(engine) -> None:
    """Hands back the model a ZeRO-3 ``engine`` trained as an ordinary model on every rank: DeepSpeed's hooks are
    removed and each parameter is replaced by a plain one holding its full value (tied parameters stay tied), so
    evaluation, the fused losses and ``save_pretrained`` see plain tensors. A collective: every rank calls it. The
    engine and its optimizer are unusable afterwards."""
    import deepspeed

    model = engine.module
    params = list(model.parameters())  # a parameter shared by several modules once
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        plain = {id(param): torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                 for param in params}
    engine.destroy()
    for module in model.modules():  # a plain dict, not ZeRO's, which gathers parameters on access
        module._parameters = {name: None if param is None else plain[id(param)]
                              for name, param in module._parameters.items()}
