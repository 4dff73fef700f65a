"""Checkpoint import (GGUF, safetensors) into lsd's NNX parameter trees."""

from lsd.convert.gguf import GGUFImport, convert_cached, import_gguf, load_judge, load_llama_gguf

__all__ = ["GGUFImport", "convert_cached", "import_gguf", "load_judge", "load_llama_gguf"]
