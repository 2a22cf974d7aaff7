"""The model-family interface. The pipeline runs compile's stages in order and asks the teacher's family for each
one; it never asks which family it holds. A new family (text encoders, causal LMs, next vision) is one class here."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from edgedistill.artifact import Manifest
    from edgedistill.data import TransferSet
    from edgedistill.targets import TargetProfile
    from edgedistill.teachers import Teacher


@dataclass
class TargetBuild:
    """One target built and validated in a stage directory: the files to ship, their manifest, and the verdict."""

    files: dict[str, Path]
    manifest: Manifest
    passed: bool


class Family(ABC):
    """What differs between model families, in the order compile() needs it.

    load_data: the transfer set (texts by default; images for vision);
    check_target: refuse a profile this family cannot build for (one line, before any model work);
    check_options: refuse options that do not fit the teacher (depth, length) or the targets, before any model work;
    distill_student: the transfer set's examples, the teacher's outputs on them (cached), the student and its
        distillation: done once for all targets (a quantization-aware one trains for what they share); returns the
        family's own record of it;
    build_target: export, optimize, quantize, validate against the teacher and time, in `stage_dir`;
    render_report / summary_cells: what a person reads about one artifact.
    """

    name: ClassVar[str]
    builtin_data: ClassVar[str] = "builtin:english"  # the built-in text set (data.BUILTIN_SETS) when --data is not given

    def load_data(self, teacher: Teacher, data_path: str | None, opts: Any) -> Any:
        """Return the transfer set (default: texts from .txt/.jsonl/.csv, or the built-in set `builtin_data`)."""
        from edgedistill.data import load_transfer_set

        return load_transfer_set(data_path, opts.text_column, opts.label_column, teacher.label_names, opts.max_texts,
                                 builtin=self.builtin_data)

    def check_target(self, profile: TargetProfile) -> None:
        """Raise ProfileError if this family cannot build an artifact for `profile` (default: every profile)."""

    @abstractmethod
    def check_options(self, teacher: Teacher, opts: Any, profiles: list[TargetProfile]) -> None:
        """Raise EdgeDistillError if `opts` cannot apply to `teacher` and `profiles`."""

    @abstractmethod
    def distill_student(self, teacher: Teacher, data: TransferSet, opts: Any, run_dir: Path | None,
                        profiles: list[TargetProfile]) -> Any:
        """Return the distilled student with everything targets are built and validated from."""

    @abstractmethod
    def build_target(self, distilled: Any, profile: TargetProfile, stage_dir: Path, opts: Any) -> TargetBuild:
        """Return the target's files, manifest and verdict, written under `stage_dir`."""

    @abstractmethod
    def render_report(self, manifest: Manifest, published: bool) -> str:
        """Return report.md for an artifact (or the .rejected.md of a target that missed its budget)."""

    @abstractmethod
    def summary_cells(self, manifest: Manifest) -> dict[str, str]:
        """Return the CLI summary table's cells for one target: fidelity, latency, size (plain text or rich markup)."""

    # --search (search.py): the student shapes to try, how to read a built artifact's point, the recipes to try on the
    # finished students. A family without student_shapes refuses --search in one line.

    def student_shapes(self, teacher: Teacher, opts: Any) -> list[dict[str, Any]]:
        """Return the students a search tries, largest first: each a dict of CompileOptions fields."""
        from edgedistill.errors import EdgeDistillError

        raise EdgeDistillError(f"--search: the {self.name} family offers no student shapes to search",
                               hint="leave out --search and choose the student with the family's options")

    def default_shape(self, teacher: Teacher, opts: Any) -> dict[str, Any] | None:
        """Return the shape a plain compile (no --search) trains, as student_shapes writes it, or None: the search
        runs that shape to its whole schedule once its first rung is measured, so its choice is never worse than
        the plain compile's student."""
        return None

    def shape_label(self, shape: dict[str, Any]) -> str:
        """Return a short name for a student shape (for tables and the plot)."""
        return ", ".join(f"{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"{k.replace('_', '-')} {v}"
                         for k, v in shape.items())

    def search_point(self, manifest: Manifest) -> tuple[str, float, float | None]:
        """Return (the fidelity metric's name, its value (higher is better), latency in ms or None if not measured)
        of a built artifact."""
        raise NotImplementedError

    def recipe_variants(self, profile: TargetProfile) -> list[tuple[str, TargetProfile]]:
        """Return the quantization recipes a search tries on its finished students: (label, profile) pairs, the
        profile's own first."""
        return [(profile.quantization.recipe, profile)]


def depth_width_label(shape: dict[str, Any]) -> str:
    """Return '3 layers' / '1 layer, FFN 0.5' for a student shape of `student_layers` and `ffn_ratio`."""
    layers, ffn = shape["student_layers"], shape.get("ffn_ratio", 1.0)
    return f"{layers} layer{'' if layers == 1 else 's'}" + ("" if ffn == 1.0 else f", FFN {ffn:g}")
