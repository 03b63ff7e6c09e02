"""Optimizer building: muP per-group LR/eps scaling survives schedule updates; groups cover every parameter."""

from __future__ import annotations

import pytest

from open360.config import compose
from open360.models import build_model
from open360.train.optim import build_optimizer, set_lr


def test_mup_groups_scale_lr_and_eps() -> None:
    cfg = compose(["+experiment=crystalcoder_tiny"])
    assert cfg.model.mup.enabled
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    width_mult = cfg.model.d_model / cfg.model.mup.base_width
    assert groups["hidden"]["lr_scale"] == pytest.approx(1 / width_mult)
    assert groups["hidden"]["eps"] == pytest.approx(cfg.optim.eps / width_mult)
    assert (
        groups["embedding"]["weight_decay"] == 0.0
        and groups["hidden"]["weight_decay"] == cfg.optim.weight_decay
    )
    set_lr(opt, 0.004)
    assert groups["hidden"]["lr"] == pytest.approx(0.004 / width_mult)
    assert groups["norms_biases"]["lr"] == pytest.approx(0.004)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("scaled", [False, True])
def test_mup_weight_decay_per_step_across_widths(scaled: bool) -> None:
    """One AdamW step with zero gradients: only weight decay moves the hidden matrices. With
    optim.mup_scale_weight_decay the shrink (lr x wd) is the same at every width (the mup library's
    MuAdamW); without, it follows the hidden LR down by 1/width_mult."""
    import torch

    shrink = {}
    for d_model in (64, 256):
        cfg = compose(["+experiment=crystalcoder_tiny", f"model.d_model={d_model}", "model.n_heads=4",
                       f"optim.mup_scale_weight_decay={scaled}"])
        model = build_model(cfg.model)
        opt = build_optimizer(model, cfg.optim)
        set_lr(opt, 0.01)
        weight = next(p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks."))
        before = weight.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        shrink[d_model] = float(1 - (weight.detach() / before)[before != 0].mean())
    ratio = shrink[256] / shrink[64]
    assert ratio == pytest.approx(1.0 if scaled else 64 / 256, rel=1e-3)


def test_standard_parametrization_has_unit_scales() -> None:
    cfg = compose(["+experiment=amber_tiny"])
    opt = build_optimizer(build_model(cfg.model), cfg.optim)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0}
    assert {g["lr"] for g in opt.param_groups} == {cfg.optim.lr}


def test_unknown_optimizer_is_refused() -> None:
    cfg = compose(["+experiment=amber_tiny", "optim.name=lion"])
    with pytest.raises(ValueError, match="optim.name='lion'"):
        build_optimizer(build_model(cfg.model), cfg.optim)


def test_betas_must_be_two_values_in_unit_interval() -> None:
    for betas in ("[0.9]", "[0.9,0.95,0.99]", "[0.9,1.0]"):
        cfg = compose(["+experiment=amber_tiny", f"optim.betas={betas}"])
        with pytest.raises(ValueError, match=r"optim.betas=.*expected two values in \[0, 1\)"):
            build_optimizer(build_model(cfg.model), cfg.optim)


def test_groups_given_as_iterators_keep_their_parameters() -> None:
    """A model's param_groups may hand over `self.parameters()` as is: counting the group's tensors must
    not use the iterator up and leave AdamW an empty group that trains nothing."""
    import torch

    class Lazy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def param_groups(self, optim_cfg: object) -> list[dict]:
            return [{"name": "all", "params": self.parameters()}]

    model = Lazy()
    opt = build_optimizer(model, compose(["+experiment=amber_tiny"]).optim)
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    before = model.lin.weight.detach().clone()
    model.lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not torch.equal(model.lin.weight, before)


def test_a_restart_also_puts_back_a_step_count_kept_per_group() -> None:
    """apex's and Transformer Engine's FusedAdam (megatron-core's inner optimizer when either is installed)
    count steps in each param group, not per parameter: a `fresh_optimizer` restart must put that count back
    too, else the fresh stage's bias correction goes on from the stage before's count."""
    import torch

    from open360.train.optim import restart_optimizer_state

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    opt.param_groups[0]["step"] = 7  # as FusedAdam keeps it
    opt.state[p] = {"exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
    restart_optimizer_state(opt)
    assert opt.param_groups[0]["step"] == 0 and type(opt.param_groups[0]["step"]) is int
    assert all(not v.any() for v in opt.state[p].values())


def test_restarting_the_optimizer_state_zeroes_moments_and_step_counts_in_place() -> None:
    """A fresh_optimizer stage's restart: moments zeroed in place (a sharded or pinned tensor keeps its layout),
    the step count at 0 whether a tensor (torch's AdamW) or a number (as other optimizers keep it); the
    hyperparameters stay."""
    import torch

    from open360.train.optim import restart_optimizer_state

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}])
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    opt.step()
    opt.state[q]["step"] = 5  # a step count kept as a plain number
    exp_avg = opt.state[p]["exp_avg"]
    restart_optimizer_state(opt)
    assert opt.state[p]["exp_avg"] is exp_avg and not exp_avg.any() and not opt.state[p]["exp_avg_sq"].any()
    assert float(opt.state[p]["step"]) == 0 and torch.is_tensor(opt.state[p]["step"])
    assert opt.state[q]["step"] == 0 and type(opt.state[q]["step"]) is int and not opt.state[q]["exp_avg"].any()
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
