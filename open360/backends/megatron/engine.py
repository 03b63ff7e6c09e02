"""megatron-core runtime: process groups, GPTModel + megatron DDP + megatron optimizer from an open360
config, one optimizer step through megatron's schedules, full-state gathering and distributed checkpoints."""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate, ParamWithNamePredicate
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from open360.backends.megatron.checkpoint_guard import guarded_distributed_load
from open360.backends.megatron.layout import (
    ParallelLayout,
    megatron_to_native,
    merge_shards,
    native_to_megatron,
    shard_for_rank,
)
from open360.backends.megatron.spec import build_gpt_model, transformer_config
from open360.checkpoint.io import CheckpointError
from open360.config.schema import ModelConfig
from open360.models.decoder import width_mult
from open360.train.optim import adam_betas, restart_optimizer_state

# Optimizer state is saved in megatron-core's canonical per-parameter layout, so a checkpoint written
# at one tensor/pipeline/data-parallel layout loads at any other.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def initialize_parallel(layout: ParallelLayout, seed: int) -> None:
    """Join (or create, for one process) the process group and build megatron's TP/PP/DP groups."""
    if not dist.is_initialized():  # one process without torchrun: a private group on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def replica_zero_group(dp_rank: int) -> Any:
    """A gloo group of data-parallel replica 0's ranks (every rank calls it), over which rank 0 gathers the
    published weights in host memory: `gather_object` over the default NCCL group allocates world size x the
    largest pickled shard on rank 0's GPU (8 replicas at 7B and TP=1: 8 x 27 GB), for shards only replica 0
    sends."""
    zero: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(zero, dp_rank == 0)
    return dist.new_group(ranks=[r for r, is_zero in enumerate(zero) if is_zero], backend="gloo")


def destroy_parallel() -> None:
    """Tear down megatron's groups (the process group is left to the caller)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _optimizer_overrides(cfg: ModelConfig, scale_weight_decay: bool = False) -> dict[ParamKey, dict[str, float]]:
    """open360's parameter groups in megatron terms: no decay on norms, biases and the embedding; muP's
    lr and eps x 1/width_mult on the hidden matrices inside the blocks (and wd x width_mult when
    `scale_weight_decay`, optim.mup_scale_weight_decay)."""
    overrides: dict[ParamKey, dict[str, float]] = {
        ParamKey(name="*.bias", predicate=ParamPredicate(name="vector", fn=lambda p: p.ndim == 1)): {"wd_mult": 0.0},
        ParamKey(name="*word_embeddings.weight"): {"wd_mult": 0.0},
    }
    if cfg.tie_embeddings:  # with pipeline stages the last one holds its own copy of the tied embedding
        overrides[ParamKey(name="*output_layer.weight")] = {"wd_mult": 0.0}
    scale = 1.0 / width_mult(cfg)
    if scale != 1.0:
        hidden = ParamWithNamePredicate(name="mup_hidden", fn=lambda p, n: p.ndim == 2 and ".layers." in n)
        overrides[ParamKey(with_name_predicate=hidden)] = {
            "lr_mult": scale, "eps_mult": scale, **({"wd_mult": 1.0 / scale} if scale_weight_decay else {})
        }
    return overrides


class MegatronEngine:
    """One rank's share of a megatron-core model: GPTModel stage, DDP wrapper, distributed optimizer."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: Any,
        layout: ParallelLayout,
        initial_state: Mapping[str, torch.Tensor],
        micro_batch_size: int,
        seq_len: int,
        bf16: bool,
        attention: str = "sdpa",
    ) -> None:
        if optim_cfg.name != "adamw":
            raise ValueError(f"optim.name={optim_cfg.name!r}: only 'adamw' is implemented")
        self.model_cfg, self.layout = model_cfg, layout
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self._replica_zero = replica_zero_group(self.dp_rank)
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.config = transformer_config(model_cfg, layout.tp, layout.pp, bf16)
        self.gpt = build_gpt_model(model_cfg, self.config, self.first_stage, self.last_stage, attention)
        initial_local = self.load_native_weights(initial_state)
        self.gpt.cuda(torch.cuda.current_device())
        if model_cfg.compile:  # like the native backend: each transformer layer through torch.compile
            for layer in self.gpt.decoder.layers:
                layer.compile()
        module = Float16Module(self.config, self.gpt) if bf16 else self.gpt
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
        )
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=module)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        self.base_eps = float(optim_cfg.eps)
        self.weight_decay = float(optim_cfg.weight_decay)
        betas = adam_betas(optim_cfg)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=float(optim_cfg.lr),
                weight_decay=self.weight_decay,
                adam_beta1=betas[0],
                adam_beta2=betas[1],
                adam_eps=self.base_eps,
                clip_grad=float(optim_cfg.grad_clip),
                bf16=bf16,
                params_dtype=torch.bfloat16 if bf16 else torch.float32,
                use_distributed_optimizer=True,
            ),
            [self.model],
            config_overrides=_optimizer_overrides(model_cfg, bool(optim_cfg.get("mup_scale_weight_decay", False))),
        )
        self._set_masters(initial_local)
        self._forward_backward = get_forward_backward_func()
        device = torch.device("cuda", torch.cuda.current_device())
        self._positions = torch.arange(seq_len, device=device).unsqueeze(0).expand(micro_batch_size, -1)

    # -- weights --------------------------------------------------------------------------------

    def load_native_weights(self, native_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Load this rank's slice of a native (open360) state dict into the GPTModel stage; return the slice."""
        local = shard_for_rank(
            native_to_megatron(native_state, self.model_cfg), self.model_cfg, self.layout, self.tp_rank, self.pp_rank
        )
        self._load_gpt_state(local, "native weights")
        return local

    def _master_shards(self) -> dict[torch.nn.Parameter, tuple[torch.Tensor, Any]]:
        """For each bf16 parameter of which this data-parallel rank's distributed optimizer holds a part:
        that part's fp32 master copy and its index range in the flattened parameter."""
        return {
            param: (master, opt._get_model_param_range_map(param)["param"])
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            for masters, params in zip(opt.shard_fp32_from_float16_groups, opt.model_float16_groups, strict=True)
            for master, param in zip(masters, params, strict=True)
        }

    @torch.no_grad()
    def _set_masters(self, local: Mapping[str, torch.Tensor]) -> None:
        """Start the fp32 master weights from the fp32 initial weights: megatron copies them from the bf16
        parameters, which would round a warm start's (or the native initializer's) weights to bf16."""
        names = {param: name for name, param in self.gpt.named_parameters()}
        for param, (master, span) in self._master_shards().items():
            master.copy_(local[names[param]].reshape(-1)[span.start : span.end])

    @torch.no_grad()
    def _full_masters(self) -> dict[str, torch.Tensor]:
        """Every bf16 parameter's fp32 master weights, whole, on data-parallel rank 0 (the distributed
        optimizer splits each among the data-parallel ranks); every rank of the stage calls it."""
        shards = self._master_shards()
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        out = {}
        for name, param in self.gpt.named_parameters():  # the same order on every data-parallel rank
            if param.dtype == torch.float32:
                continue
            whole = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if param in shards:
                master, span = shards[param]
                whole[span.start : span.end] = master
            dist.all_reduce(whole, group=group)  # each element is one rank's; the others add zeros
            if self.dp_rank == 0:
                out[name] = whole.view(param.shape).cpu()
        return out

    def _load_gpt_state(self, state: Mapping[str, Any], source: str) -> None:
        """Load this stage's GPTModel weights, raising if any key is missing or left over (a partial load
        would otherwise go unnoticed); `_extra_state` entries (Transformer Engine metadata) are optional."""
        missing, unexpected = self.gpt.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(
                f"megatron stage {self.pp_rank}/tp {self.tp_rank}, loading {source}: "
                f"missing {missing}, unexpected {unexpected}"
            )

    def full_native_state(self) -> dict[str, torch.Tensor] | None:
        """Every weight in open360's native names on global rank 0 (None elsewhere); every rank calls it.
        A bf16 run publishes its fp32 master weights, as the native backend does, not their bf16 copy."""
        masters = self._full_masters()
        if self.dp_rank != 0:  # the other replicas hold the same weights
            return None
        local = (
            self.tp_rank,
            self.pp_rank,
            {
                k: masters[k] if k in masters else v.detach().float().cpu()
                for k, v in self.gpt.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
            },
        )
        size = dist.get_world_size(self._replica_zero)
        if size == 1:  # TP = PP = 1: rank 0 holds every weight (gather_object would pickle them all to itself)
            gathered: list[Any] | None = [local]
        else:
            gathered = [None] * size if dist.get_rank() == 0 else None
            dist.gather_object(local, gathered, dst=0, group=self._replica_zero)
        if gathered is None:
            return None
        shards = {(t, p): sd for t, p, sd in gathered}
        return megatron_to_native(merge_shards(shards, self.model_cfg, self.layout), self.model_cfg)

    # -- one step -------------------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        """Every group's lr, weight decay and eps from the schedule's lr and the group's multipliers."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
            group["eps"] = self.base_eps * group.get("eps_mult", 1.0)

    @staticmethod
    def _loss(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    def _forward_step(self, data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        tokens = next(data_iterator)
        output = model(tokens[:, :-1], self._positions, None, labels=tokens[:, 1:])
        return output, self._loss

    def forward_backward(self, rows: torch.Tensor) -> torch.Tensor:
        """Forward/backward over this replica's rows [n, seq_len+1]; returns the replica-mean loss on every rank."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = list(rows.split(self.micro_batch_size))
        outputs = self._forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro),
            model=[self.model],
            num_microbatches=len(micro),
            seq_length=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            forward_only=False,
        )
        contributes = self.last_stage and self.tp_rank == 0
        loss = torch.stack([o["loss"] for o in outputs]).mean() if contributes else torch.zeros((), device=rows.device)
        dist.all_reduce(loss)
        return loss / self.layout.dp

    def optimizer_step(self) -> float:
        """Clip and step; returns the global gradient norm (NaN when megatron skipped the step)."""
        _, grad_norm, _ = self.optimizer.step()
        return math.nan if grad_norm is None else float(grad_norm)

    # -- distributed checkpoints ----------------------------------------------------------------

    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        model = self.gpt.sharded_state_dict()
        return {
            "model": model,
            "optimizer": self.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=OPTIMIZER_SHARDING),
        }

    def save_distributed(self, directory: Path) -> None:
        """Every rank writes its shards of model + optimizer into `directory` (megatron dist_checkpointing).
        Before the first step (a step-0 checkpoint) the optimizer has no state, which megatron's state_dict
        cannot read: it is given the state a fresh AdamW starts from (step 0, zero moments)."""
        if not any(self._inner_states()):  # before the first step: no parameter has state yet
            self._materialize_optimizer_state()
            self.restart_optimizer_state()
        if dist.get_rank() == 0:
            Path(directory).mkdir(parents=True, exist_ok=False)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(is_loading=False), str(directory))
        dist.barrier()

    def restart_optimizer_state(self) -> None:
        """This rank's optimizer state (its shards of every inner AdamW) back to a new optimizer's."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            restart_optimizer_state(opt.optimizer)

    def _inner_states(self) -> list[list[dict[str, Any]]]:
        """Per inner torch optimizer, its per-parameter states (empty lists before the first step)."""
        return [
            list(opt.optimizer.state.values()) for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        ]

    @torch.no_grad()
    def _materialize_optimizer_state(self) -> None:
        """Give a fresh optimizer its per-parameter state (step, moments) by one step with zero gradients,
        zero lr and zero weight decay (parameters unchanged), so megatron can map checkpoint state onto it."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
            inner.zero_grad(set_to_none=True)
            for g, (lr, wd) in zip(inner.param_groups, saved, strict=True):
                g["lr"], g["weight_decay"] = lr, wd

    def _patch_torch_adam_state_loading(self) -> None:
        """Work around megatron-core's distributed optimizer on torch's AdamW (no Transformer Engine or apex):
        `load_state_dict` first gives every parameter state a "step", then copies each parameter's saved
        state over *all* its state keys, but the saved state has no per-parameter "step" (kept once per
        group), so loading raises KeyError('step'). Copy only the saved keys; "step" is set by megatron."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 or not hasattr(
                opt, "_set_main_param_and_optimizer_states"
            ):
                continue

            def set_states(model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor], opt: Any = opt) -> None:
                group_index, group_order = opt.model_param_group_index_map[model_param]
                main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
                state = opt.optimizer.state[main_param]
                for key, value in tensors.items():
                    (main_param if key == "param" else state[key]).copy_(value)

            opt._set_main_param_and_optimizer_states = set_states

    def _check_saved_param_groups(self, saved: Any, directory: Path) -> None:
        """CheckpointError naming the cause when the checkpoint lacks one of this run's parameter groups
        (megatron matches groups by their lr/wd multipliers and would raise a bare KeyError)."""
        groups = saved.get("optimizer", {}).get("param_groups") if isinstance(saved, Mapping) else None
        if groups is None:
            return

        def keys(gs: Any) -> set[tuple]:
            return {tuple(g.get(k) for k in param_group_identifier_keys) for g in gs}

        missing = keys(self.optimizer.param_groups) - keys(groups)
        if missing:
            group = dict(zip(param_group_identifier_keys, min(missing), strict=True))
            raise CheckpointError(
                f"{directory}: the optimizer state has no parameter group with {group} "
                "(this run's muP width or optim.mup_scale_weight_decay differ from the checkpoint's); resume with "
                "the checkpoint's values, or start from its weights with trainer.init_from (fresh optimizer)"
            )

    def load_distributed(self, directory: Path) -> None:
        """Load model + optimizer shards saved at any parallel layout. The moments and step counts come from
        the checkpoint; the hyperparameters (betas, eps, weight decay, muP multipliers) stay this run's, as on
        the native backend (megatron's load would put back the checkpoint's)."""
        with guarded_distributed_load(directory):  # torch DCP unpickles parts of it: plain data only
            self._materialize_optimizer_state()
            self._patch_torch_adam_state_loading()
            loaded = dist_checkpointing.load(self._sharded_state(is_loading=True), str(directory))
        self._load_gpt_state(loaded["model"], f"distributed checkpoint {directory}")
        self._check_saved_param_groups(loaded["optimizer"], directory)
        configured = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(loaded["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)
        # megatron sets one "step" tensor into every parameter's state (torch's AdamW, no apex/TE); AdamW
        # then adds 1 to it once per parameter per step, and the bias correction goes wrong: own copies.
        for states in self._inner_states():
            for state in states:
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
