"""Other inference engines as candidates: their per-op tensors stored under the workbook's (position, layer, op) keys."""
