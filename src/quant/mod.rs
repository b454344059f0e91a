//! Codecs of the quantized weight formats (SPEC §5).
