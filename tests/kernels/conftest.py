"""Kernel tests run on the GPU when there is one, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported, hence here. Three gaps of the
Triton 3.6 interpreter are patched for the test session only; none touches a GPU run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter() -> None:
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    needed = ("_patch_lang_tensor", "InterpreterBuilder", "TensorHandle", "_convert_float")
    if getattr(interpreter, "_pagedllm_patched", False) or not all(
            hasattr(interpreter, name) for name in needed):
        return  # already patched, or a Triton whose interpreter is laid out differently
    interpreter._pagedllm_patched = True

    # A loaded scalar used as a loop bound goes through int() on a 1-element array, which
    # NumPy >= 2.4 refuses (triton-lang/triton#9171): squeeze it first.
    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patched_tensor

    # bfloat16 is stored as uint16 and tl.dot multiplies the bit patterns
    # (triton-lang/triton#11584): convert bfloat16 operands to float32 first, which is exact.
    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def to_float32(x: Any) -> Any:
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    def patched_dot(self: Any, a: Any, b: Any, *args: Any) -> Any:
        return create_dot(self, to_float32(a), to_float32(b), *args)

    builder.create_dot = patched_dot

    # Conversions to float8e4nv round the mantissa without carrying into the exponent (124.5
    # becomes 64): convert through torch, which rounds to nearest even as the GPU's cvt.rn does
    # (inputs are clamped to +-448 first, as the kernels do, so saturation never differs).
    fp_to_fp = builder.create_fp_to_fp
    torch_dtypes = {tl.float32: torch.float32, tl.float16: torch.float16,
                    tl.bfloat16: torch.bfloat16, tl.float8e4nv: torch.float8_e4m3fn}

    def patched_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if tl.float8e4nv not in (src_ty, dst_ty) or not {src_ty, dst_ty} <= set(torch_dtypes):
            return fp_to_fp(self, src, dst_type, rounding_mode)
        raw = torch.from_numpy(np.ascontiguousarray(src.data))
        out = raw.view(torch_dtypes[src_ty]).to(torch_dtypes[dst_ty])
        if dst_ty == tl.bfloat16:
            out = out.view(torch.uint16)
        elif dst_ty == tl.float8e4nv:
            out = out.view(torch.uint8)
        return interpreter.TensorHandle(out.numpy(), dst_ty)

    builder.create_fp_to_fp = patched_fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter()
