"""fp8parity: a falsifier-cascade workbook for FP8 vs CPU parity of quantized Qwen2 GGUF models."""

from fp8parity.errors import WorkbookError

__all__ = ["WorkbookError"]
__version__ = "0.1.0"
