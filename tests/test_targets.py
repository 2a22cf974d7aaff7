"""Target profiles: built-ins, resolution by name / path, validation errors, CPU detection, JSON schema."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_profile

from edgedistill import targets
from edgedistill.errors import ProfileError
from edgedistill.quantize.configs import Fp32Config
from edgedistill.targets import (
    TARGETS_DIR,
    TargetProfile,
    builtin_profiles,
    detect_target,
    load_profile_file,
    profile_json_schema,
    resolve_target,
)

BUILTINS = ("android-executorch", "arm64-mobile", "browser-wasm", "browser-webgpu", "nvidia-gpu-fp16", "nvidia-tensorrt-int8", "raspberry-pi-4", "x86-64-avx2",
            "x86-64-avx512", "x86-64-executorch")

VALID = """name: my-device
threads: 2
quantization:
  recipe: dynamic-int8
"""


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- built-in profiles -------------------------------------------------------------------------------------------

def test_builtin_yaml_files_exist():
    names = sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))
    assert names == sorted(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_profile_file_loads_and_name_matches_file(name):
    profile = load_profile_file(TARGETS_DIR / f"{name}.yaml")
    assert isinstance(profile, TargetProfile)
    assert profile.name == name
    assert (profile.runtime, profile.execution_provider) in {("onnxruntime", "CPUExecutionProvider"), ("executorch", "XNNPACK"),
                                                             ("onnxruntime", "CUDAExecutionProvider"),
                                                             ("onnxruntime", "TensorrtExecutionProvider"),
                                                             ("onnxruntime-web", "wasm"), ("onnxruntime-web", "webgpu")}
    assert profile.threads >= 1
    # only onnxruntime's x86 CPU profiles are auto-selected here (GPU profiles and x86-64-executorch never are: they
    # name no CPU flags; XNNPACK picks its kernels at run time)
    assert ("avx2" in profile.cpu_flags) == (profile.arch == "x86_64" and not profile.gpu
                                             and profile.runtime == "onnxruntime")
    assert profile.quantization.recipe in ("dynamic-int8", "static-qdq-int8", "xnnpack-dynamic-int8", "fp16", "fp32")
    assert getattr(profile.quantization, "per_channel", True) is True
    # devices run one text at a time; a GPU serves batches
    assert profile.input_shape.batch == (8 if profile.gpu else 1) and profile.input_shape.sequence == 128
    assert 0.0 < profile.accuracy_budget.min_cosine <= 1.0


def test_builtin_profiles_values():
    profiles = builtin_profiles()
    assert sorted(profiles) == sorted(BUILTINS)
    # AVX2 without VNNI needs 7-bit weights; AVX-512 VNNI does not.
    assert profiles["x86-64-avx2"].quantization.reduce_range is True
    assert profiles["x86-64-avx512"].quantization.reduce_range is False
    assert set(profiles["x86-64-avx512"].cpu_flags) == {"avx2", "avx512f", "avx512_vnni"}
    assert profiles["x86-64-avx2"].cpu_flags == ["avx2"]


# ---- resolve_target ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTINS)
def test_resolve_target_by_name(name):
    assert resolve_target(name).name == name
    assert resolve_target(name) == builtin_profiles()[name]


def test_resolve_target_by_yaml_path(tmp_path):
    path = write_profile(tmp_path / "tiny-cpu.yaml", min_cosine=0.75)
    profile = resolve_target(str(path))
    assert profile.name == "tiny-cpu"
    assert profile.threads == 1
    assert profile.input_shape.sequence == 16
    assert profile.accuracy_budget.min_cosine == 0.75
    assert profile.quantization.recipe == "dynamic-int8"


def test_resolve_target_by_yml_path_with_fp32(tmp_path):
    path = write_profile(tmp_path / "fp.yml", name="fp", quantization="recipe: fp32", optimization="none")
    profile = resolve_target(str(path))
    assert isinstance(profile.quantization, Fp32Config)
    assert profile.optimization == "none"


def test_resolve_target_defaults_filled(tmp_path):
    profile = resolve_target(str(_write(tmp_path, VALID)))
    assert profile.opset == 17
    assert profile.optimization == "transformer-fusion"
    assert profile.input_shape.batch == 1 and profile.input_shape.sequence == 128
    assert profile.accuracy_budget.min_cosine == pytest.approx(0.90)
    assert profile.quantization.per_channel is True and profile.quantization.reduce_range is False


def test_resolve_target_missing_yaml_path(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        resolve_target(str(tmp_path / "nope.yaml"))


def test_resolve_target_unknown_name_lists_builtins():
    with pytest.raises(ProfileError) as exc:
        resolve_target("raspberry-pi-5")
    text = str(exc.value)
    assert "raspberry-pi-5" in exc.value.message
    for name in BUILTINS:
        assert name in text


def test_resolve_target_none_detects(monkeypatch):
    monkeypatch.setattr(targets, "cpu_flags", lambda: {"avx2", "sse4_2"})
    assert resolve_target(None).name == "x86-64-avx2"


# ---- malformed profiles ------------------------------------------------------------------------------------------

def _error_for(tmp_path, text) -> ProfileError:
    with pytest.raises(ProfileError) as exc:
        load_profile_file(_write(tmp_path, text))
    # resolve_target goes through the same path
    with pytest.raises(ProfileError):
        resolve_target(str(tmp_path / "p.yaml"))
    return exc.value


def test_unknown_key_names_field(tmp_path):
    err = _error_for(tmp_path, VALID + "gpu: true\n")
    assert "'gpu'" in err.message


def test_unknown_nested_key_names_field(tmp_path):
    err = _error_for(tmp_path, VALID + "input_shape: {batch: 1, seq_len: 16}\n")
    assert "input_shape.seq_len" in err.message


def test_wrong_type_threads(tmp_path):
    err = _error_for(tmp_path, VALID.replace("threads: 2", 'threads: "many"'))
    assert "'threads'" in err.message


def test_threads_out_of_range(tmp_path):
    err = _error_for(tmp_path, VALID.replace("threads: 2", "threads: 0"))
    assert "'threads'" in err.message


def test_missing_required_threads(tmp_path):
    err = _error_for(tmp_path, VALID.replace("threads: 2\n", ""))
    assert "'threads'" in err.message


def test_missing_quantization(tmp_path):
    err = _error_for(tmp_path, "name: x\nthreads: 1\n")
    assert "'quantization'" in err.message


def test_bad_recipe_name(tmp_path):
    err = _error_for(tmp_path, VALID.replace("dynamic-int8", "static-int4"))
    assert "quantization" in err.message
    assert "static-int4" in err.message or "recipe" in err.message


def test_bad_recipe_option(tmp_path):
    err = _error_for(tmp_path, VALID + "  per_tensor: true\n")
    assert "quantization" in err.message and "per_tensor" in err.message


def test_fp32_recipe_rejects_int8_options(tmp_path):
    err = _error_for(tmp_path, VALID.replace("dynamic-int8", "fp32") + "  per_channel: true\n")
    assert "per_channel" in err.message


def test_bad_optimization_value(tmp_path):
    err = _error_for(tmp_path, VALID + "optimization: aggressive\n")
    assert "'optimization'" in err.message


def test_bad_name_pattern(tmp_path):
    err = _error_for(tmp_path, VALID.replace("my-device", "'../evil'"))
    assert "'name'" in err.message


def test_budget_out_of_range(tmp_path):
    err = _error_for(tmp_path, VALID + "accuracy_budget: {min_cosine: 1.5}\n")
    assert "accuracy_budget.min_cosine" in err.message


def test_opset_too_low(tmp_path):
    err = _error_for(tmp_path, VALID + "opset: 11\n")
    assert "'opset'" in err.message


def test_invalid_yaml(tmp_path):
    err = _error_for(tmp_path, "name: [unclosed\nthreads: 1\n")
    assert "not valid YAML" in err.message
    assert "p.yaml" in err.message


def test_yaml_list_instead_of_mapping(tmp_path):
    err = _error_for(tmp_path, "- name: x\n- threads: 1\n")
    assert "mapping" in err.message
    assert "p.yaml" in err.message


def test_empty_yaml(tmp_path):
    err = _error_for(tmp_path, "")
    assert "mapping" in err.message


def test_non_utf8_profile(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"name: caf\xe9\nthreads: 1\n")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile_file(path)


def test_error_message_names_the_file(tmp_path):
    err = _error_for(tmp_path, VALID + "gpu: true\n")
    assert str(tmp_path / "p.yaml") in err.message
    assert err.hint  # tells the user how to see every field


# ---- detect_target -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [
    ({"avx2"}, "x86-64-avx2"),
    ({"sse4_2", "avx", "avx2", "fma"}, "x86-64-avx2"),
    ({"avx512f", "avx512_vnni", "avx2"}, "x86-64-avx512"),
    ({"avx512f", "avx512_vnni", "avx2", "avx512bw", "avx512vl"}, "x86-64-avx512"),
    ({"avx2", "avx512f"}, "x86-64-avx2"),  # no VNNI: not the avx512 profile
])
def test_detect_target_most_specific(monkeypatch, flags, expected):
    monkeypatch.setattr(targets, "cpu_flags", lambda: set(flags))
    assert detect_target().name == expected


@pytest.mark.parametrize("flags", [set(), {"sse4_2", "avx"}, {"neon", "asimd"}, {"avx512f", "avx512_vnni"}])
def test_detect_target_none_matches(monkeypatch, flags):
    monkeypatch.setattr(targets, "cpu_flags", lambda: set(flags))
    with pytest.raises(ProfileError, match="no built-in target matches"):
        detect_target()


def test_cpu_flags_returns_set_of_strings():
    flags = targets.cpu_flags()
    assert isinstance(flags, set)
    assert all(isinstance(f, str) and f for f in flags)


# ---- JSON schema -------------------------------------------------------------------------------------------------

def test_profile_json_schema():
    schema = profile_json_schema()
    assert isinstance(schema, dict)
    assert json.loads(json.dumps(schema)) == schema
    props = schema["properties"]
    for field in ("quantization", "threads", "name", "input_shape", "accuracy_budget", "optimization"):
        assert field in props
    assert "threads" in schema["required"] and "quantization" in schema["required"]
    text = json.dumps(schema)
    assert "dynamic-int8" in text and "fp32" in text
