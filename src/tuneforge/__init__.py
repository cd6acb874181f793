"""tuneforge: fine-tune pre-trained language models (SFT, instruction tuning, LoRA, QLoRA)."""

__version__ = "0.1.0"
