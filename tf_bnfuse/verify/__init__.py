"""Verification: test inputs, the comparison on every device, and the TFLite check."""
