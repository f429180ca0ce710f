"""The fused step's backward: ``scale_grad_kernel`` multiplies the unscaled gradient of
``ce_step_kernel`` by grad_output and the reduction's scale, in one launch.
"""
import triton
import triton.language as tl


@triton.jit
def scale_grad_kernel(grad_ptr, gout_ptr, gout_stride, scale_ptr, out_ptr, numel, C,
                      PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Backward in ONE launch: ``out = grad * (grad_output * scale)`` over the ``numel`` =
    B * C gradient entries, with grad_output and the scale read from device memory (a 0-d
    grad_output, or one per row under reduction "none", any stride). The same float32
    roundings as ``fastsel.ops``' formula (``s = g_out.float() * scale``;
    ``(grad.float() * s).to(grad.dtype)``), so bit-identical."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    if PER_ROW:
        g = tl.load(gout_ptr + (offs // C) * gout_stride, mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.load(gout_ptr).to(tl.float32)
    s = g * tl.load(scale_ptr)
    y = tl.load(grad_ptr + offs, mask=m, other=0.0).to(tl.float32) * s
    if out_ptr.dtype.element_ty != tl.float32:   # round to nearest even, as torch's .to()
        y = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out_ptr + offs, y, mask=m)
