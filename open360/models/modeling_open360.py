"""transformers remote code for open360-format folders: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

export_hf copies this file into every open360-format folder (CrystalCoder and other configs without a stock
class). It wraps open360's own Decoder, so loading needs `pip install open360` where the folder is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from open360.models.decoder import Decoder, Rotary, inference_config


class Open360Config(PretrainedConfig):
    """HF config carrying the full open360 ModelConfig under `open360_model_config`."""

    model_type = "open360"

    def __init__(self, open360_model_config: dict | None = None, **kwargs) -> None:
        self.open360_model_config = open360_model_config or {}
        kwargs["tie_word_embeddings"] = False  # a tied head lives inside the Decoder; HF must not re-tie it
        super().__init__(**kwargs)
        if self.open360_model_config:
            self.vocab_size = self.open360_model_config["vocab_size"]
            self.hidden_size = self.open360_model_config["d_model"]
            self.num_hidden_layers = self.open360_model_config["n_layers"]
            self.num_attention_heads = self.open360_model_config["n_heads"]
            self.max_position_embeddings = self.open360_model_config["max_seq_len"]


class Open360ForCausalLM(PreTrainedModel, GenerationMixin):
    """open360 Decoder under `model.`; forward(input_ids, labels=None) -> logits (and the shifted LM loss)."""

    config_class = Open360Config
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: Open360Config) -> None:
        super().__init__(config)
        self.model = Decoder(inference_config(config.open360_model_config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Parameters are all loaded from the folder; only the rotary tables (non-persistent) are computed."""
        if isinstance(module, Rotary):
            module.reset_tables()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Full causal forward (no HF cache: generate() recomputes the prefix each step).

        Padding: on the right, the causal mask leaves real tokens untouched; on the left (batched
        `generate`, lm-eval's `generate_until`), each padded row's real tokens run on their own from position
        0, as in training, and its pad positions get zero logits. A mask with holes is refused.
        """
        logits = self.model(input_ids) if attention_mask is None else self._masked_logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _masked_logits(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of a padded batch: the rows padded on the left are run one by one, unpadded."""
        real = attention_mask.to(torch.bool)
        width = real.shape[1]
        starts = (~real).long().cumprod(dim=1).sum(dim=1)  # each row's leading pad positions
        ends = starts + real.sum(dim=1)
        slots = torch.arange(width, device=real.device)
        block = (slots[None, :] >= starts[:, None]) & (slots[None, :] < ends[:, None])
        # each row: pads then real tokens to its end (left), or real tokens then pads (right), never both
        bad = (real != block).any(dim=1) | ((starts > 0) & (ends != width))
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"open360 remote code: attention_mask rows {rows} are neither left- nor right-padded")
        if not bool((starts > 0).any()):
            return self.model(input_ids)
        logits = None
        for b, start in enumerate(starts.tolist()):
            if start >= width:
                continue  # all padding: zero logits
            row = self.model(input_ids[b : b + 1, start:])[0]
            if logits is None:
                logits = row.new_zeros(input_ids.shape[0], width, row.shape[-1])
            logits[b, start:] = row
        return self.model(input_ids) if logits is None else logits

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}
