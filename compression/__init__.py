"""Codecs: zstd framing, DeMo DCT + top-k, index and value coding, int8 quantisation, the
DiLoCo pseudo-gradient and catch-up state codecs. Pure functions on tensors and bytes."""

from swarmnode.compression.components import decode_components, encode_components
from swarmnode.compression.dct import ChunkedDCT, energy_ratio, scatter_chunks, topk_chunks
from swarmnode.compression.framing import compress, decompress
from swarmnode.compression.indices import decode_indices, encode_indices, index_bits_bound
from swarmnode.compression.quant import (
    decode_tensor_dict,
    dequantize_int8,
    encode_tensor_dict,
    quantize_int8,
)
from swarmnode.compression.values import decode_values, encode_values

__all__ = [
    "ChunkedDCT",
    "compress",
    "decode_components",
    "decode_indices",
    "decode_tensor_dict",
    "decode_values",
    "decompress",
    "dequantize_int8",
    "encode_components",
    "encode_indices",
    "encode_tensor_dict",
    "encode_values",
    "energy_ratio",
    "index_bits_bound",
    "quantize_int8",
    "scatter_chunks",
    "topk_chunks",
]
