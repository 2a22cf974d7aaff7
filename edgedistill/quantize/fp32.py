"""The fp32 'recipe': the optimized graph as it is."""
from __future__ import annotations

import shutil
from pathlib import Path

from edgedistill.quantize import register_recipe
from edgedistill.quantize.configs import Fp32Config


@register_recipe(Fp32Config)
def keep_fp32(model_path: Path, config: Fp32Config, out_path: Path, calibration=()) -> Path:
    shutil.copyfile(model_path, out_path)
    return out_path
