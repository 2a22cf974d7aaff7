"""edgedistill: distill, quantize and verify a teacher model into a device artifact per target."""
__version__ = "0.1.0"
