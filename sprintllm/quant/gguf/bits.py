"""Field extraction shared by the block decoders.

Every decoder receives `blocks`, a uint8 tensor [n_blocks, type_size] (often a strided
view into the raw rows), and slices its fields by byte offset.
"""

import torch


def f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of each block, as float32 [n_blocks, 1].

    The copy of the two bytes makes the dtype view legal whatever the block stride
    and storage offset are; it costs 2 bytes per block.
    """
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def unpack_bits(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Split every byte of `packed` [n, m] into its 8 // bits fields of `bits` bits.

    ggml packs small fields plane by plane: within each run of `group` bytes, the
    lowest field of every byte comes first, then the next-lowest field of every byte,
    and so on. So field f of byte j of a run is logical element f * group + j, and
    the result is uint8 [n, m * 8 // bits] in logical order. With group=1 the fields
    of one byte stay together (byte-major), as in Q5_0's high-bit words.
    """
    n, m = packed.shape
    # Shifting a contiguous copy by scalars is several times faster than shifting the
    # strided field view, or shifting by a broadcast tensor of shift amounts.
    runs = packed.contiguous().reshape(n, m // group, group)
    mask = (1 << bits) - 1
    fields = [(runs >> shift) & mask for shift in range(0, 8, bits)]
    return torch.stack(fields, dim=2).reshape(n, m * 8 // bits)
