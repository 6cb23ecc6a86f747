"""transformers integration: after ``import binaryllm``, ``AutoModelForCausalLM.from_pretrained(packed_folder)``
builds the model with PackedBinaryLinear layers and loads the packed bits into them.

A registered quantization config (``quant_method: "binaryllm"``) and quantizer: before the weights load,
the quantizer swaps the layers named in the config for PackedBinaryLinear, whose buffers (``weight`` uint8,
``weight_scale``, ``input_scale``, ``bias``) match the checkpoint's tensors by name, shape and dtype.  It
cannot quantize a float checkpoint on the fly (use ``binaryllm convert`` + ``pack``)."""
from __future__ import annotations

from ..errors import BinaryLLMError


def register() -> None:
    from transformers.quantizers import auto as qauto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .packed import FORMAT_VERSION, QUANT_METHOD, _set_module

    if QUANT_METHOD in qauto.AUTO_QUANTIZER_MAPPING:
        return

    class BinaryLLMConfig(QuantizationConfigMixin):
        def __init__(self, format_version: int = FORMAT_VERSION, bit_order: str = "lsb-first",
                     modules: dict | None = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.bit_order = bit_order
            self.modules = modules or {}

    class BinaryLLMHfQuantizer(HfQuantizer):
        requires_calibration = True  # a packed checkpoint is needed; no on-the-fly quantization

        def validate_environment(self, *args, **kwargs):
            v = self.quantization_config.format_version
            if v != FORMAT_VERSION:
                raise BinaryLLMError(f"packed folder has format_version {v}; this binaryllm reads "
                                     f"{FORMAT_VERSION}: upgrade binaryllm or re-export the model")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from ..nn.packed import PackedBinaryLinear
            for name, spec in self.quantization_config.modules.items():
                _set_module(model, name, PackedBinaryLinear(spec["in_features"], spec["out_features"], spec["bias"],
                                                            spec["input_scale"]))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    qauto.register_quantization_config(QUANT_METHOD)(BinaryLLMConfig)
    qauto.register_quantizer(QUANT_METHOD)(BinaryLLMHfQuantizer)
