"""Defaults that more than one part of the workbook reads: defined here once."""

from __future__ import annotations

DEFAULT_PROMPTS = ["What is 2+2?", "Write a Python function that reverses a string."]
DEFAULT_PATHS = ("prefill", "decode")
