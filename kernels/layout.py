"""Index helpers shared by the elementwise Triton kernels that walk a dense (N, C, H, W) tensor
as a flat array in either layout and read the others through their strides."""
import triton
import triton.language as tl


@triton.jit
def flat_offsets(BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's flat offsets: int32 unless a tensor has 2^31 elements or more (fewer
    registers, and no 64-bit division in the decoding below). One return: Triton's compiler
    checks every return's type, even one behind a constexpr branch it does not take."""
    if INDEX_64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    return start + tl.arange(0, BLOCK)


@triton.jit
def decode_nchw(offs, channels, rows, cols, CHANNELS_LAST: tl.constexpr):
    """(n, c, row, col) of flat offsets into a dense (N, C, rows, cols) tensor of that layout."""
    if CHANNELS_LAST:
        c = offs % channels
        rest = offs // channels
        col = rest % cols
        rest = rest // cols
        row = rest % rows
        n = rest // rows
    else:
        col = offs % cols
        rest = offs // cols
        row = rest % rows
        rest = rest // rows
        c = rest % channels
        n = rest // channels
    return n, c, row, col
