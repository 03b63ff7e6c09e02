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

        Left padding is not supported: pad on the right (the causal mask then leaves real tokens untouched).
        """
        if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("open360 remote code: left padding is not supported; use padding_side='right'")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}
