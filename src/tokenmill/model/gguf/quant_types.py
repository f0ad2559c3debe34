"""The ggml tensor types tokenmill reads, and the names of those it refuses.

Sizes are the GGUF format's: a row of `n` values is `n / block_size` blocks of
`block_bytes` bytes each.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantType:
    ggml_type: int
    name: str
    block_size: int  # values per block
    block_bytes: int  # bytes per block

    def row_bytes(self, row_len: int) -> int:
        """Bytes of one row of `row_len` values; ValueError if it is not whole blocks."""
        if row_len % self.block_size:
            raise ValueError(
                f"a row of {row_len} values is not a whole number of {self.name} blocks of {self.block_size}."
            )
        return row_len // self.block_size * self.block_bytes


F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30

QUANT_TYPES: dict[int, QuantType] = {
    t.ggml_type: t
    for t in (
        QuantType(F32, "F32", 1, 4),
        QuantType(F16, "F16", 1, 2),
        QuantType(BF16, "BF16", 1, 2),
        QuantType(Q4_0, "Q4_0", 32, 18),
        QuantType(Q4_1, "Q4_1", 32, 20),
        QuantType(Q5_0, "Q5_0", 32, 22),
        QuantType(Q5_1, "Q5_1", 32, 24),
        QuantType(Q8_0, "Q8_0", 32, 34),
        QuantType(Q4_K, "Q4_K", 256, 144),
        QuantType(Q5_K, "Q5_K", 256, 176),
        QuantType(Q6_K, "Q6_K", 256, 210),
    )
}

# Other ggml types, only to name them when refusing a file.
_OTHER_NAMES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def ggml_type_name(ggml_type: int) -> str:
    if ggml_type in QUANT_TYPES:
        return QUANT_TYPES[ggml_type].name
    return _OTHER_NAMES.get(ggml_type, f"ggml type {ggml_type}")
