"""LR schedules (cosine, linear, constant, wsd) and multi-stage runs built from configs."""

from __future__ import annotations

import math
import re

import pytest

from open360.config import compose
from open360.train.schedules import Schedule, build_stages, lr_at, stage_at


def test_cosine_amber_shape() -> None:
    s = Schedule("cosine", total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert s.factor(0) == pytest.approx(0.01)
    assert s.factor(99) == pytest.approx(1.0)
    assert s.factor(999) == pytest.approx(0.1)
    mid = s.factor(100 + 449)
    assert 0.5 < mid < 0.6
    values = [s.factor(i) for i in range(100, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_constant_wsd() -> None:
    lin = Schedule("linear", total_steps=100, warmup_steps=10, min_lr_ratio=0.0)
    assert lin.factor(9) == pytest.approx(1.0)
    assert lin.factor(99) == pytest.approx(0.0)
    assert lin.factor(54) == pytest.approx(0.5)
    const = Schedule("constant", total_steps=50)
    assert {const.factor(i) for i in range(50)} == {1.0}
    wsd = Schedule("wsd", total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert wsd.factor(50) == 1.0 and wsd.factor(79) == 1.0
    assert wsd.factor(89) == pytest.approx(0.5)
    assert wsd.factor(99) == pytest.approx(0.0)


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="schedule.kind='step'"):
        Schedule("step", total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        Schedule("cosine", total_steps=10, warmup_steps=-1)
    short = Schedule("cosine", total_steps=10, warmup_steps=20)  # a run cut before its warmup ends
    assert short.factor(9) == pytest.approx(0.5)


def test_single_implicit_stage_from_config() -> None:
    cfg = compose(["+experiment=amber_tiny"])
    (stage,) = build_stages(cfg)
    assert stage.start == 0 and stage.steps == cfg.trainer.max_steps
    assert stage.recipe == cfg.data.recipe
    assert lr_at([stage], 19) == pytest.approx(cfg.optim.lr)
    assert lr_at([stage], cfg.trainer.max_steps - 1) == pytest.approx(cfg.optim.lr * 0.1)


def test_crystalcoder_three_stages_each_with_own_warmup() -> None:
    cfg = compose(["+experiment=crystalcoder_tiny"])
    stages = build_stages(cfg)
    assert [(s.start, s.end) for s in stages] == [(0, 100), (100, 200), (200, 240)]
    lr = cfg.optim.lr
    assert lr_at(stages, 0) == pytest.approx(lr / 10)
    assert lr_at(stages, 99) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(stages, 100) == pytest.approx(lr / 10)  # stage 2 warms up again
    assert lr_at(stages, 204) == pytest.approx(lr)
    assert stage_at(stages, 239).name == "stage3_code"


def test_crystalcoder_follows_the_published_learning_rates() -> None:
    """LLM360/crystalcoder-train params.yaml: phase 1 warms up to 0.012 in 86 steps and decays linearly
    towards 1.2408e-4 over 294,337 steps, but stops at step 79,721, where its LR (~0.0088) is phase 2's
    peak; phase 2 (peak 0.0087825) and phase 3 (0.002, 276 warmup steps) decay to their end LR."""
    stages = build_stages(compose(["+experiment=crystalcoder"]))
    assert [(s.start, s.end, s.lr) for s in stages] == [
        (0, 79721, 0.012), (79721, 294108, 0.0087825), (294108, 321836, 0.002)]

    def published(peak: float, end: float, warmup: int, decay: int, step: int) -> float:  # Cerebras "Linear"
        return peak * step / warmup if step < warmup else peak + (end - peak) * (step - warmup) / decay

    for step in (0, 85, 86, 40000, 79720):
        assert lr_at(stages, step) == pytest.approx(published(0.012, 1.2408e-4, 86, 294337, step + 1), rel=1e-3)
    assert lr_at(stages, 79720) == pytest.approx(0.0087825, rel=1e-3)  # phase 2 starts from where 1 stopped
    for step in (86, 100000, 214386):
        assert lr_at(stages, 79721 + step) == pytest.approx(
            published(0.0087825, 1.3679e-4, 86, 214301, step + 1), rel=1e-3)
    assert lr_at(stages, 321835) == pytest.approx(2e-4, rel=1e-6)
    # phase 3 loaded phase 2's weights alone (Cerebras' is_pretrained_checkpoint: True): a fresh AdamW state
    assert [s.fresh_optimizer for s in stages] == [False, False, True]


def test_a_decay_planned_past_the_stage_end() -> None:
    s = Schedule("linear", total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_steps=180)
    assert s.factor(9) == 1.0 and s.factor(99) == pytest.approx(1 - 90 / 180)  # cut halfway down
    short = Schedule("cosine", total_steps=100, warmup_steps=0, min_lr_ratio=0.1, decay_steps=50)
    assert short.factor(49) == pytest.approx(0.1) and short.factor(99) == pytest.approx(0.1)  # then holds the floor
    for kind, steps in (("wsd", 10), ("constant", 10), ("linear", 0)):
        with pytest.raises(ValueError, match="decay_steps"):
            Schedule(kind, total_steps=100, decay_steps=steps)
    with pytest.raises(ValueError, match=r"stages\.0\.schedule: decay_steps=0"):
        build_stages(compose(["+experiment=crystalcoder_tiny", "stages.0.schedule.decay_steps=0"]))


def test_max_steps_cuts_stages_keeping_schedule() -> None:
    cfg = compose(["+experiment=crystalcoder_tiny", "trainer.max_steps=150"])
    stages = build_stages(cfg)
    assert [(s.start, s.end) for s in stages] == [(0, 100), (100, 150)]
    assert stages[1].schedule.total_steps == 100  # the cut stage keeps its configured length
    assert math.isclose(lr_at(stages, 149), cfg.optim.lr * stages[1].schedule.factor(49))


def test_wsd_without_a_decay_phase_stays_at_peak() -> None:
    flat = Schedule("wsd", 100, 0, 0.0, 0.0)
    assert [flat.factor(i) for i in (0, 50, 98, 99)] == [1.0, 1.0, 1.0, 1.0]
    assert Schedule("wsd", 100, 0, 0.0, 0.2).factor(99) == 0.0  # with one, it still ends at the floor


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("optim.grad_clip=-1", "optim.grad_clip=-1.0: must be >= 0"),
        ("trainer.seq_len=256", "trainer.seq_len=256 exceeds model.max_seq_len=128"),
    ],
)
def test_settings_refuse_values_that_would_train_wrongly(override: str, says: str) -> None:
    from open360.train.validate import check_training_config

    with pytest.raises(ValueError, match=re.escape(says)):
        check_training_config(compose(["+experiment=amber_tiny", override]))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["+experiment=crystalcoder_tiny", "stages.0.lr=-0.01"], "stages.0.lr=-0.01 (stage 'stage1_text')"),
        (["+experiment=amber_tiny", "optim.lr=-0.001"], "optim.lr=-0.001: the peak learning rate must be >= 0"),
        (["+experiment=crystalcoder_tiny", "trainer.max_steps=1000"], "trainer.max_steps=1000 exceeds the 240 steps"),
        (["+experiment=crystalcoder_tiny", "stages.2.name=stage1_text"], "stages.2.name='stage1_text': stage 0 has"),
        (["+experiment=crystalcoder_tiny", "stages.1.name='code (python)'"], "stages.1.name='code (python)': use"),
        (["+experiment=crystalcoder_tiny", "stages.1.steps=0"], "stages.1.steps=0 (stage 'stage2_text_code_fim')"),
    ],
)
def test_stages_refuse_a_negative_peak_and_a_run_longer_than_its_stages(overrides: list[str], says: str) -> None:
    """A negative learning rate trains by gradient ascent; max_steps past the stages' end stopped early; two
    stages of one name would be mixed up by the resume checks and the records that find a stage by name."""
    with pytest.raises(ValueError, match=re.escape(says)):
        build_stages(compose(overrides))


def test_extending_a_finished_run_warns_of_the_lr_jump(tmp_path, capsys) -> None:
    from omegaconf import OmegaConf

    from open360.config import compose
    from open360.train.pipeline import warn_if_schedule_changed
    from open360.train.schedules import build_stages

    done = compose(["+experiment=amber_tiny", "trainer.max_steps=12", "schedule.warmup_steps=3"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(done))
    longer = compose(["+experiment=amber_tiny", "trainer.max_steps=24", "schedule.warmup_steps=3"])
    warn_if_schedule_changed(tmp_path, build_stages(longer), 12)  # resumed from the finished run's last step
    err = capsys.readouterr().err
    assert "at step 13 the learning rate is" in err and "ended its schedule at step 12" in err
    warn_if_schedule_changed(tmp_path, build_stages(done), 12)  # nothing left to train: no warning
    assert capsys.readouterr().err == ""


def test_extending_a_run_cut_inside_its_stages_does_not_warn(tmp_path, capsys) -> None:
    """A staged run stopped early by trainer.max_steps and extended: the same schedule goes on, no warning."""
    from omegaconf import OmegaConf

    from open360.train.pipeline import warn_if_schedule_changed

    cut = compose(["+experiment=crystalcoder_tiny", "trainer.max_steps=150"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cut))
    warn_if_schedule_changed(tmp_path, build_stages(compose(["+experiment=crystalcoder_tiny"])), 150)
    assert capsys.readouterr().err == ""
    other = compose(["+experiment=crystalcoder_tiny", "stages.1.lr=0.5"])
    warn_if_schedule_changed(tmp_path, build_stages(other), 150)
    assert "at step 151 the learning rate is" in capsys.readouterr().err
