"""Every CUDA source of the cupy kernels compiles (nvcc, float and double), without a GPU or cupy.

The cupy path cannot run here; this catches typos and type errors in kernels before a user's
first GPU step. Elementwise bodies are wrapped the way cupy wraps them (inputs as const
values, outputs as references, ``i`` the element index); the raw templates are instantiated
for float and double. Skips, saying so, where nvcc is not installed.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from orchestrator.engine import cuda_sources, rng

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA kernel sources not compile-checked")
C_TYPES = {"T": "T", "uint64": "unsigned long long", "int64": "long long", "uint32": "unsigned int",
           "int32": "int", "float64": "double", "float32": "float"}


def _elementwise_kernels():
    kernels = {"orch_dropout_mask": cuda_sources.DROPOUT_MASK}
    for activation in cuda_sources.ACT_FORWARD:
        kernels[f"orch_{activation}"] = cuda_sources.act(activation)
        for masked in (False, True):
            kernels[f"orch_bias_{activation}_{masked}"] = cuda_sources.bias_act(activation, masked)
            kernels[f"orch_{activation}_grad_{masked}"] = cuda_sources.act_grad(activation, masked)
    kernels.update({f"orch_{rule}": body for rule, body in cuda_sources.OPTIMIZERS.items()})
    return kernels


def _wrap(name: str, in_params: str, out_params: str, operation: str) -> str:
    """A __global__ kernel that gives ``operation`` what cupy's generated code gives it."""
    args, loads = [], []
    for index, param in enumerate(p.split() for p in in_params.split(",")):
        kind, var = param
        args.append(f"const {C_TYPES[kind]}* in{index}")
        loads.append(f"const {C_TYPES[kind]} {var} = in{index}[i];")
    for index, param in enumerate(p.split() for p in out_params.split(",")):
        kind, var = param
        args.append(f"{C_TYPES[kind]}* out{index}")
        loads.append(f"{C_TYPES[kind]} &{var} = out{index}[i];")
    return (f"__global__ void {name}({', '.join(args)}, long long n) {{\n"
            f"  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n  if (i >= n) return;\n"
            f"  {' '.join(loads)}\n  {operation}\n}}\n")


def _compile(source: str, tmp_path, stem: str) -> None:
    path = tmp_path / f"{stem}.cu"
    path.write_text(source)
    result = subprocess.run([NVCC, "-ptx", "-arch=sm_80", "--fmad=false", "-o", str(tmp_path / f"{stem}.ptx"),
                             str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{stem} does not compile:\n{result.stderr}"


@pytest.mark.parametrize("c_type", ["float", "double"])
def test_elementwise_kernels_compile(c_type, tmp_path):
    body = "".join(_wrap(name, *definition) for name, definition in _elementwise_kernels().items())
    _compile(f"typedef {c_type} T;\n{rng.CUDA_PHILOX_SOURCE}\n{body}", tmp_path, f"elementwise_{c_type}")


@pytest.mark.parametrize("key", sorted(cuda_sources.RAW_SOURCES))
def test_raw_kernels_compile_for_float_and_double(key, tmp_path):
    source, functions = cuda_sources.RAW_SOURCES[key]
    uses = "".join(f"  (void)&{f}<{t}>;\n" for f in functions for t in ("float", "double"))
    _compile(f"{source}\nvoid orch_instantiate() {{\n{uses}}}\n", tmp_path, key)
