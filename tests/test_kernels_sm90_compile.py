"""Every kernel compiles for an H100 (sm_90), on a machine without a GPU.

The interpreter forgives things the compiler does not (loop-carried types, constexpr
misuse, shared memory), so this compiles each kernel's flag variants with its first and
last GPU autotune config through triton's bundled ptxas, in a subprocess without
TRITON_INTERPRET (the kernels must be imported as real JIT functions there).
Run directly (`python tests/test_kernels_sm90_compile.py`) it prints what it compiled.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEMORY_LIMIT = 232448  # bytes per block on an H100

# kernel: (module, argument types, constexpr variants). bf16 activations, fp32 side tensors.
KERNELS = {
    "_rms_norm_fwd_kernel": ("rms_norm", dict(
        x_ptr="*bf16", x_stride_outer="i32", x_stride_inner="i32", n_inner="i32", w_ptr="*fp32",
        y_ptr="*bf16", rstd_ptr="*fp32", n_rows="i32", n_cols="i32", eps="fp32",
    ), [dict(HAS_WEIGHT=True, BLOCK_N=1024), dict(HAS_WEIGHT=False, BLOCK_N=256)]),
    "_rms_norm_bwd_kernel": ("rms_norm", dict(
        dy_ptr="*bf16", x_ptr="*bf16", x_stride_outer="i32", x_stride_inner="i32", n_inner="i32",
        w_ptr="*fp32", rstd_ptr="*fp32", dx_ptr="*bf16", dw_partial_ptr="*fp32", n_rows="i32",
        n_cols="i32",
    ), [dict(HAS_WEIGHT=True, BLOCK_N=1024), dict(HAS_WEIGHT=False, BLOCK_N=256)]),
    "_cross_entropy_fwd_kernel": ("cross_entropy", dict(
        logits_ptr="*bf16", logits_row_stride="i64", targets_ptr="*i64", loss_ptr="*fp32",
        lse_ptr="*fp32", grad_scale_ptr="*fp32", n_cols="i32", ignore_index="i32",
        softcap="fp32",
    ), [dict(HAS_SOFTCAP=True, WRITE_GRAD=True), dict(HAS_SOFTCAP=False, WRITE_GRAD=False)]),
    "_cross_entropy_bwd_kernel": ("cross_entropy", dict(
        logits_ptr="*bf16", logits_row_stride="i32", targets_ptr="*i64", lse_ptr="*fp32",
        grad_scale_ptr="*fp32", grad_ptr="*bf16", n_cols="i32", ignore_index="i32",
        softcap="fp32",
    ), [dict(HAS_SOFTCAP=True)]),
    "_rotary_kernel": ("rotary", dict(
        x_ptr="*bf16", x_stride_b="i32", x_stride_t="i32", x_stride_h="i32", cos_ptr="*fp32",
        sin_ptr="*fp32", cos_stride_t="i32", sin_stride_t="i32", y_ptr="*bf16", n_rows="i32",
        seq_len="i32", n_heads="i32", half="i32",
    ), [dict(INVERSE=False, BLOCK_N=32), dict(INVERSE=True, BLOCK_N=64)]),
    "_relu_squared_fwd_kernel": ("relu_squared", dict(
        x_ptr="*bf16", y_ptr="*bf16", n_elements="i64",
    ), [{}]),
    "_relu_squared_bwd_kernel": ("relu_squared", dict(
        dy_ptr="*bf16", y_ptr="*bf16", dx_ptr="*bf16", n_elements="i32",
    ), [{}]),
    "_xxt_kernel": ("xxt", dict(
        x_ptr="*bf16", x_stride_b="i32", x_stride_m="i32", x_stride_k="i32", a_ptr="*bf16",
        M="i32", K="i32",
    ), [dict(CAST_FP32=False)]),
}


def compile_all() -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done = []
    for name, (module, types, variants) in KERNELS.items():
        autotuner = getattr(importlib.import_module(f"kernels.{module}"), name)
        fn = autotuner.fn
        for flags in variants:
            first_last = {id(c): c for c in (autotuner.configs[0], autotuner.configs[-1])}
            for config in first_last.values():
                constants = {**flags, **config.kwargs}
                signature = {a: "constexpr" if a in constants else types[a] for a in fn.arg_names}
                source = ASTSource(fn, signature, constexprs={
                    (fn.arg_names.index(a),): v for a, v in constants.items()})
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
                    "num_warps": config.num_warps, "num_stages": config.num_stages})
                assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT, (name, constants)
                done.append(f"{name} {constants} num_warps={config.num_warps}")
    return done


def test_every_kernel_is_listed():
    for module in {m for m, _, _ in KERNELS.values()} | {"linear_cross_entropy"}:
        names = [n for n in vars(importlib.import_module(f"kernels.{module}"))
                 if n.endswith("_kernel")]
        assert all(n in KERNELS for n in names), f"add {names} of kernels/{module}.py to KERNELS"


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1", "unset TRITON_INTERPRET to compile"
    sys.path.insert(0, str(ROOT))
    print("\n".join(compile_all()))
