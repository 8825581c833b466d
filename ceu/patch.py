"""One call that makes a Hugging Face causal LM compute its training loss with the fused cross-entropy.

After ``ceu.patch_causal_lm(model)``, ``model(input_ids, labels=labels)`` returns transformers' causal-LM loss
(``ForCausalLMLoss``: labels shifted left by one inside, ``ignore_index`` -100 or as given, ``shift_labels`` taken as
given, the token mean, or ``sum / num_items_in_batch`` when a trainer passes it for gradient accumulation) computed by
:func:`ceu.linear_cross_entropy` on the LM head's weight, and ``logits`` None: no ``[tokens, V]`` tensor is made. A
call without labels is the model's own. So any trainer that trains on ``model(...).loss`` (transformers.Trainer, TRL's
SFTTrainer, open-unlearning's fine-tuning) gets the memory saving with no other change.

The mechanism is two hooks on the module you patch, not a copy of each family's forward: before the forward, the labels
and loss arguments are taken out of the call and the LM head is swapped for an identity, so the model's own forward
(with whatever it does: ``logits_to_keep``, caches, PEFT adapters, DDP/FSDP/ZeRO hooks) returns the final hidden states
in place of the logits; after it, the head is put back (also when the forward raises) and the loss is computed on them.
The forward's signature is untouched, so Trainer's inspection of it (``num_items_in_batch``, unused columns) sees the
model's own. Patch the module your trainer calls: a PEFT model after wrapping (PEFT calls its base model's ``forward``
directly, past the hooks).
"""
import inspect
import weakref

import torch

from ceu.cross_entropy import linear_cross_entropy
from ceu.heads import causal_lm, head_parameters, lm_head
from ceu.zero3 import gathered_lm_head

LOSS_ARGUMENTS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index")
_PATCHES: "weakref.WeakKeyDictionary[torch.nn.Module, FusedLossPatch]" = weakref.WeakKeyDictionary()


class FusedLossPatch:
    """The patch of one model (see the module docstring); ``remove()`` or leaving its ``with`` block undoes it."""

    def __init__(self, model: torch.nn.Module, impl: str = "auto"):
        lm = causal_lm(model)
        lm_head(model)  # refuses a head that is not a plain linear layer, or logits the model transforms (soft-capping)
        loss_type = getattr(lm, "loss_type", None)
        if getattr(lm, "_loss_function", None) is not None or loss_type not in (None, "ForCausalLM"):
            raise ValueError(f"{type(lm).__name__} has its own loss ({loss_type or 'a custom loss_function'}): the "
                             "patch replaces transformers' ForCausalLMLoss only")
        peft_config = getattr(model, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ValueError("a prompt-learning PEFT model (virtual tokens) is not supported by the fused-loss patch")
        self.model, self.lm, self.impl = model, lm, impl
        self._signature = inspect.signature(model.forward)
        self._calls: list = []  # per call in flight: (the head swapped out, the loss arguments), or None
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    def _keywords(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name (positional ones bound to the forward's signature)."""
        if not args:
            return dict(kwargs)
        bound = self._signature.bind(*args, **kwargs).arguments
        for name, parameter in self._signature.parameters.items():
            if parameter.kind == inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
            elif parameter.kind == inspect.Parameter.VAR_POSITIONAL and bound.get(name):
                raise TypeError(f"{type(self.model).__name__}.forward got extra positional arguments: pass the "
                                "inputs by name to the patched model")
        return bound

    def _before(self, module, args, kwargs):
        self._calls.append(None)
        arguments = self._keywords(args, kwargs)
        if arguments.get("labels") is None or arguments.get("fused_lm_head"):
            return None  # no labels: the model's own forward, logits and all; TRL's own fused head: left to it
        if arguments.get("return_dict") is False:
            raise ValueError("return_dict=False with labels: the patched model returns no logits, so the tuple's "
                             "positions would shift; use the returned ModelOutput")
        loss_arguments = {name: arguments.pop(name) for name in LOSS_ARGUMENTS if name in arguments}
        head = self.lm.get_output_embeddings()
        self.lm.set_output_embeddings(torch.nn.Identity())
        self._calls[-1] = (head, loss_arguments)
        return (), arguments

    def _after(self, module, args, kwargs, output):
        call = self._calls.pop()
        if call is None:
            return None
        head, loss_arguments = call
        self.lm.set_output_embeddings(head)
        if output is None:  # the forward raised (this hook always runs): the head is back, the error goes on
            return None
        fields = {name: value for name, value in output.items() if name != "logits"}
        return type(output)(**fields, loss=self.loss(output.logits, **loss_arguments))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, shift_labels: torch.Tensor | None = None,
             num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100) -> torch.Tensor:
        """transformers' ``ForCausalLMLoss`` of the logits ``hidden @ W.T + b``, fused."""
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        if hidden.shape[:-1] != shift_labels.shape:
            raise ValueError(f"the model kept {tuple(hidden.shape[:-1])} positions (logits_to_keep?) but the labels "
                             f"are {tuple(shift_labels.shape)}: with labels, keep every position, as transformers does")
        with gathered_lm_head(self.model):
            weight, bias = head_parameters(self.model, hidden.dtype)
            if num_items_in_batch is None:
                return linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index,
                                            impl=self.impl)
            total = linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index,
                                         reduction="sum", impl=self.impl)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def remove(self) -> None:
        """Undo the patch: the hooks go, and the model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _PATCHES.get(self.model) is self:
            del _PATCHES[self.model]

    def __enter__(self) -> "FusedLossPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch_causal_lm(model: torch.nn.Module, impl: str = "auto") -> FusedLossPatch:
    """Make ``model(..., labels=...)`` return the fused cross-entropy loss and no logits (see :mod:`ceu.patch`).

    Returns the patch; ``with ceu.patch_causal_lm(model): ...`` undoes it at the end of the block, as do
    ``patch.remove()`` and :func:`unpatch_causal_lm`. ``impl`` picks the backend, as in
    :func:`ceu.linear_cross_entropy`. Refused: a model already patched, an LM head that is not a plain
    ``nn.Linear``, logits the model transforms after the head (Gemma 2's ``final_logit_softcapping``, a
    ``logit_scale``), a model with a loss other than ``ForCausalLMLoss``, prompt-learning PEFT models.

    One difference from transformers: a batch whose labels are all ``ignore_index`` has loss 0, not NaN.
    """
    if model in _PATCHES:
        raise ValueError("the model is already patched: unpatch_causal_lm(model) first")
    patch = FusedLossPatch(model, impl)
    _PATCHES[model] = patch
    return patch


def unpatch_causal_lm(model: torch.nn.Module) -> None:
    """Undo :func:`patch_causal_lm` on ``model``."""
    patch = _PATCHES.get(model)
    if patch is None:
        raise ValueError("the model is not patched (patch_causal_lm was not called on this module)")
    patch.remove()
