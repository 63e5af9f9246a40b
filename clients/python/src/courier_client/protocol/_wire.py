"""Fixed layouts shared by the encoder and the decoder."""

import struct

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FRAME_HEAD = struct.Struct(">IB")
_BATCH_HEAD = struct.Struct(">IBI")
_VERSION = struct.Struct(">HH")
_SEND_OUTCOME = struct.Struct(">QHH")
_DELIVERY_HEAD = struct.Struct(">QI")
_NACK = struct.Struct(">QI")
_WELCOME_HEAD = struct.Struct(">HQI")
_MASK_U32 = 0xFFFF_FFFF
_MASK_U64 = 0xFFFF_FFFF_FFFF_FFFF
