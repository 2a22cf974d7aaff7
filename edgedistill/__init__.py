"""edgedistill: distill, quantize and verify a teacher model into a device artifact per target."""
__version__ = "0.1.0"

import logging as _logging

# third-party import-time noise a user can do nothing about: torchao (which transformers imports when it is
# installed, as ExecuTorch's dependency) warns about CUDA-only kernels on CPU machines, and torch warns about
# torchao's Enum registrations
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
