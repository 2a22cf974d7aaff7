"""Loading teacher checkpoints."""
from edgedistill.teachers.hf import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher"]
