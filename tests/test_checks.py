"""ceu.checks: bad input fails early with an error that names the argument."""
import pytest
import torch

import ceu

H, V = 8, 20


def good():
    return {"hidden": torch.randn(2, 5, H), "weight": torch.randn(V, H), "bias": torch.randn(V),
            "mask": torch.ones(2, 5, dtype=torch.bool)}


LMF_CASES = [
    ({"hidden": [[1.0] * H]}, TypeError, "hidden must be a torch.Tensor"),
    ({"hidden": torch.ones(2, H, dtype=torch.int64)}, TypeError, "hidden must be a floating-point"),
    ({"hidden": torch.tensor(1.0)}, ValueError, "hidden must have shape"),
    ({"weight": torch.randn(V, H + 1)}, ValueError, "weight must be [V, H]"),
    ({"weight": torch.randn(V, H, 1)}, ValueError, "weight must have 2 dimension"),
    ({"weight": torch.randn(V, H, dtype=torch.float64)}, TypeError, "weight dtype torch.float64 does not match"),
    ({"weight": torch.randn(V, H, device="meta")}, ValueError, "weight is on meta"),
    ({"weight": torch.randn(0, H)}, ValueError, "empty vocabulary"),
    ({"bias": torch.randn(V + 1)}, ValueError, "bias must be [V]"),
    ({"bias": torch.randn(V, dtype=torch.float16)}, TypeError, "bias dtype"),
    ({"mask": torch.ones(2, 5)}, TypeError, "mask must be a bool tensor"),
    ({"mask": torch.ones(10, dtype=torch.bool)}, ValueError, "mask must have shape"),
    ({"vocab_size": V + 1}, ValueError, "vocab_size must be an int in [1, V = 20]"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be an int"),
    ({"vocab_size": 3.0}, ValueError, "vocab_size must be an int"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"impl": "cutlass"}, ValueError, "impl must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
]


@pytest.mark.parametrize("change,error,message", LMF_CASES, ids=[m for _, _, m in LMF_CASES])
def test_lmf_bad_input(change, error, message):
    args = good() | change
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        ceu.linear_lmf_loss(args.pop("hidden"), args.pop("weight"), args.pop("bias"), **args)


CE_CASES = [
    ({"labels": torch.zeros(2, 5)}, TypeError, "labels must be an int64 or int32"),
    ({"labels": torch.zeros(10, dtype=torch.long)}, ValueError, "labels must have shape"),
    ({"labels": torch.full((2, 5), V, dtype=torch.long)}, ValueError, "labels must lie in"),
    ({"labels": torch.full((2, 5), -1, dtype=torch.long)}, ValueError, "labels must lie in"),
    ({"labels": torch.full((2, 5), 15, dtype=torch.long), "vocab_size": 15}, ValueError, "labels must lie in"),
    ({"weight": torch.randn(V, H - 1)}, ValueError, "weight must be"),
]


@pytest.mark.parametrize("change,error,message", CE_CASES, ids=[m for _, _, m in CE_CASES])
def test_cross_entropy_bad_input(change, error, message):
    args = good() | {"labels": torch.zeros(2, 5, dtype=torch.long)} | change
    del args["mask"]
    with pytest.raises(error, match=message):
        ceu.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("bias"), **args)
