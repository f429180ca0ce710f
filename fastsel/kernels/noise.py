"""Counter-based uniforms, bit-exact with ``fastsel.rng.uniform``.

The reference hashes in int64 with 32-bit masks; here every step is uint32 arithmetic,
whose wrap-around is exactly that mask, so both give the same 32 bits and the same float.
"""
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (``fastsel.rng.mix32``)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["base"])
def uniform_kernel(idx_ptr, out_ptr, n, base, BLOCK: tl.constexpr):
    """out[i] = ((h >> 8) + 0.5) / 2**24 with h = mix32(mix32(idx ^ base) + base)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(idx_ptr + offs, mask=m, other=0).to(tl.int64).to(tl.uint32)
    b = base.to(tl.int64).to(tl.uint32)
    h = _mix32(_mix32(x ^ b) + b)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + offs, u, mask=m)
