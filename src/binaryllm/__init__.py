"""binaryllm: turn a pre-trained Hugging Face causal LM into a real 1-bit model.

    import binaryllm as bl
    model = bl.binarize(model, bl.BinaryConfig(method="cpt"))
    bl.train(model, cfg, data)          # or: bl.convert(cfg, out="runs/x")
    bl.freeze(model)                    # weights become sign(W~) * per-row scale
"""
from .api import binarize, binary_modules, freeze, set_binarizer
from .config import BinaryConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import BinaryLLMError
from .export import load_packed as load
from .export import pack, save_packed
from .runs import load_run
from .train import Trainer, TrainData, convert, train

__version__ = "0.1.0"

__all__ = ["binarize", "binary_modules", "freeze", "set_binarizer", "BinaryConfig", "DataConfig",
           "ModelConfig", "RunConfig", "TrainConfig", "BinaryLLMError", "load_run", "Trainer",
           "TrainData", "convert", "train", "pack", "save_packed", "load"]
