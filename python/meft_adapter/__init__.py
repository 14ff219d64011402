"""Use a MEFT or parallel adapter trained by meft with Hugging Face transformers.

    from transformers import AutoModelForCausalLM
    import meft_adapter

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    meft_adapter.attach(model, "runs/x/export")   # the folder `meft-worker export` wrote

See adapter.py for the method, README.md for the commands.
"""

from .adapter import AdapterConfig, AttachedAdapter, ExportError, attach, read_config, read_tensors

__all__ = ["AdapterConfig", "AttachedAdapter", "ExportError", "attach", "read_config",
           "read_tensors"]
