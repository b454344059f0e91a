"""The ctypes mirror of include/fdmoe.h: struct layouts (compiled with the C compiler), enum
numbers and feature bits (parsed from the header), versions, queries and library lookup."""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fdmoe
from fdmoe import _lib

REPO = Path(__file__).resolve().parents[3]
HEADER = Path(os.environ.get("FDMOE_HEADER", REPO / "include" / "fdmoe.h"))
STRUCTS = {
    "FdmoeConfig": _lib.FdmoeConfig,
    "FdmoeWeights": _lib.FdmoeWeights,
    "FdmoeForwardArgs": _lib.FdmoeForwardArgs,
    "FdmoeMemoryRequirements": _lib.FdmoeMemoryRequirements,
}

needs_header = pytest.mark.skipif(not HEADER.is_file(), reason=f"no header at {HEADER}")


def header_text() -> str:
    text = HEADER.read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


@needs_header
def test_struct_fields_in_header_order():
    text = header_text()
    for name, cls in STRUCTS.items():
        body = re.search(r"typedef struct %s \{(.*?)\} %s;" % (name, name), text, re.S)
        assert body, name
        fields = [re.findall(r"\w+", decl)[-1] for decl in body.group(1).split(";") if decl.strip()]
        assert fields == [f for f, _ in cls._fields_], name


@needs_header
def test_struct_layouts_match_the_c_compiler(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler")
    lines = []
    for name, cls in STRUCTS.items():
        lines.append(f'printf("{name} %zu %zu\\n", sizeof({name}), _Alignof({name}));')
        for field, _ in cls._fields_:
            lines.append(
                f'printf("{name}.{field} %zu %zu\\n", offsetof({name}, {field}), '
                f"sizeof((({name} *)0)->{field}));"
            )
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"fdmoe.h\"\nint main(void) {\n"
        + textwrap.indent("\n".join(lines), "    ")
        + "\n    return 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=c11", "-I", str(HEADER.parent), str(src), "-o", str(exe)], check=True)
    c_layout = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        key, a, b = line.split()
        c_layout[key] = (int(a), int(b))
    for name, cls in STRUCTS.items():
        assert c_layout[name] == (ctypes.sizeof(cls), ctypes.alignment(cls)), name
        for field, _ in cls._fields_:
            desc = getattr(cls, field)
            assert c_layout[f"{name}.{field}"] == (desc.offset, desc.size), f"{name}.{field}"


@pytest.mark.parametrize(
    "cls,init",
    [
        (_lib.FdmoeConfig, "fdmoe_config_init"),
        (_lib.FdmoeWeights, "fdmoe_weights_init"),
        (_lib.FdmoeForwardArgs, "fdmoe_forward_args_init"),
    ],
)
def test_init_writes_our_struct_size(cls, init):
    assert _lib.init_struct_raw_size(cls, init) == ctypes.sizeof(cls)
    assert _lib.init_struct(cls, init).struct_size == ctypes.sizeof(cls)


def test_config_defaults_from_the_library():
    cfg = _lib.init_struct(_lib.FdmoeConfig, "fdmoe_config_init")
    assert cfg.backend == _lib.BACKEND_KIND["cpu"]
    assert cfg.routing == _lib.ROUTING["softmax_topk"]
    assert cfg.renormalize == 1 and cfg.routed_scaling_factor == 1.0
    assert cfg.n_group == 1 and cfg.topk_group == 1 and cfg.ep_size == 1
    assert cfg.max_tokens == 4096


_DTYPE_HEADER_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16",
                       "fp8_block": "FP8_BLOCK", "mxfp4": "MXFP4", "nvfp4": "NVFP4"}


@needs_header
def test_enum_numbers_match_the_header():
    text = header_text()
    tables = {
        "STATUS": {k: v for k, v in _lib.STATUS.items()},
        "BACKEND_KIND": {k.upper(): v for k, v in _lib.BACKEND_KIND.items()},
        "ROUTING": {k.upper(): v for k, v in _lib.ROUTING.items()},
        "SCORING": {k.upper(): v for k, v in _lib.SCORING.items()},
        "ACTIVATION": {k.upper(): v for k, v in _lib.ACTIVATION.items()},
        "DTYPE": {_DTYPE_HEADER_NAMES[k]: v for k, v in _lib.DTYPE.items()},
        "LAYOUT": {k.upper(): v for k, v in _lib.LAYOUT.items()},
        "GATE_LAYOUT": {k.upper(): v for k, v in _lib.GATE_LAYOUT.items()},
        "OWNERSHIP": {k.upper(): v for k, v in _lib.OWNERSHIP.items()},
        "MEMORY": {k.upper(): v for k, v in _lib.MEMORY.items()},
        "ACT_QUANT": {k.upper(): v for k, v in _lib.ACT_QUANT.items()},
    }
    for enum_body in re.findall(r"enum Fdmoe\w+\s*(?:#if.*?#endif[^\n]*)?\s*\{(.*?)\};", text, re.S):
        values = dict(re.findall(r"FDMOE_([A-Z0-9_]+) = (\d+)", enum_body))
        assert values
        prefix = max((p for p in tables if all(k.startswith(p + "_") for k in values)), key=len)
        header = {k[len(prefix) + 1:]: int(v) for k, v in values.items()}
        assert header == tables.pop(prefix), prefix
    assert not tables, f"enums missing from the header: {list(tables)}"


@needs_header
def test_feature_bits_and_versions_match_the_header():
    text = header_text()
    bits = {k.lower(): 1 << int(n) for k, n in re.findall(r"#define FDMOE_FEATURE_(\w+) \(1 << (\d+)\)", text)}
    assert bits == _lib.FEATURES == fdmoe.FEATURES
    defines = dict(re.findall(r"#define (FDMOE_\w+) (\d+)\s*$", text, re.M))
    assert int(defines["FDMOE_VERSION_MAJOR"]) == _lib.BINDING_ABI_MAJOR
    assert int(defines["FDMOE_VERSION_MINOR"]) == _lib.BINDING_ABI_MINOR
    assert int(defines["FDMOE_FORWARD_FORCE_EAGER"]) == _lib.FORWARD_FORCE_EAGER
    major, minor, patch = (int(defines[f"FDMOE_VERSION_{p}"]) for p in ("MAJOR", "MINOR", "PATCH"))
    assert fdmoe.abi_version() == (major << 16) | minor
    assert fdmoe.version() == f"{major}.{minor}.{patch}"


def test_status_names_come_from_the_library():
    lib = _lib.load()
    for name, code in _lib.STATUS.items():
        assert lib.fdmoe_status_string(code).decode() == name
    e = fdmoe._errors.error_for_status(99, "UNKNOWN_STATUS", "from the future")
    assert type(e) is fdmoe.FdmoeError and e.code == 99 and e.status == "UNKNOWN_STATUS"


def test_versions():
    assert isinstance(fdmoe.version(), str) and fdmoe.version().count(".") == 2
    assert fdmoe.abi_version() >> 16 == _lib.BINDING_ABI_MAJOR
    assert fdmoe.abi_version() & 0xFFFF >= _lib.BINDING_ABI_MINOR


def test_query_features():
    cpu = fdmoe.query_features()
    assert isinstance(cpu, fdmoe.FeatureSet) and isinstance(cpu, frozenset)
    for name in ("routing_softmax_topk", "routing_sigmoid_topk", "routing_grouped_topk",
                 "routing_given", "routing_record", "latent", "shared_experts",
                 "act_f32", "act_bf16", "act_f16", "layout_torch", "layout_paddle"):
        assert name in cpu
    assert "LATENT" in cpu and "FDMOE_FEATURE_LATENT" in cpu
    assert "cuda_graphs" not in cpu
    assert cpu.bits == sum(_lib.FEATURES[n] for n in cpu)
    assert cpu == fdmoe.query_features("cpu")
    cuda = fdmoe.query_features("cuda:0")
    assert isinstance(cuda, fdmoe.FeatureSet)
    with pytest.raises(fdmoe.InvalidArgumentError):
        fdmoe.query_features("gpu")


def test_memory_requirements():
    kw = dict(latent_size=8, num_shared_experts=1, shared_intermediate_size=4, max_tokens=64,
              act_dtype="bfloat16", weight_dtype="bfloat16")
    req = fdmoe.memory_requirements(8, 2, 16, 6, **kw)
    assert set(req) == {"device_weight_bytes", "device_workspace_bytes", "device_graph_bytes",
                        "host_weight_bytes", "host_workspace_bytes"}
    assert req["host_weight_bytes"] > 0 and req["device_weight_bytes"] == 0
    with fdmoe.MoELayer(8, 2, 16, 6, **kw) as layer:
        assert layer.memory_requirements() == req
    bigger = fdmoe.memory_requirements(8, 2, 16, 6, **dict(kw, max_tokens=128))
    assert bigger["host_workspace_bytes"] > req["host_workspace_bytes"]
    with pytest.raises(fdmoe.InvalidArgumentError):
        fdmoe.memory_requirements(8, 9, 16, 6)


def _run_python(code: str, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "FDMOE_LIBRARY"}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(Path(fdmoe.__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


def test_bad_library_path_raises_library_load_error():
    r = _run_python(
        "import fdmoe\n"
        "try:\n    fdmoe.version()\n"
        "except fdmoe.LibraryLoadError as e:\n    print('OK', e)\n",
        FDMOE_LIBRARY="/nonexistent/libfdmoe.so",
    )
    assert r.returncode == 0 and r.stdout.startswith("OK") and "/nonexistent/libfdmoe.so" in r.stdout, r


def test_finds_the_repository_build_without_the_environment_variable():
    candidates = [p for p in _lib.candidate_paths() if p.is_file()]
    if not candidates:
        pytest.skip("no library next to the package or in the repository's target/")
    r = _run_python("import fdmoe, fdmoe._lib as l; fdmoe.version(); print(l.load()._name)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == candidates[0]
