"""Frozen configuration objects, one per concern."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class CacheConfig:
    """Capacity of the compiled model.

    max_batch_size: most sequences in one generate()/forward() call.
    max_seq_len: most tokens (prompt + generated) per sequence; ``None`` takes the
        model's own limit (``max_position_embeddings``, and the sliding window where the
        model has one, see :func:`pdcompile.api.default_max_seq_len`).
    paged: KV cache as a pool of ``block_size``-token blocks (the paged_kv pass) instead
        of one contiguous cache per call.
    prefix_cache: reuse the pool's blocks of an identical prompt prefix (paged only).
    kv_cache_memory / kv_cache_blocks: pool size; by default enough for
        max_batch_size full-length sequences, capped at 512 MiB.
    """

    max_batch_size: int = 8
    max_seq_len: int | None = None
    paged: bool = True
    block_size: int = 16
    prefix_cache: bool = True
    kv_cache_memory: int | None = None  # bytes for the paged pool; None: see default_pool_blocks
    kv_cache_blocks: int | None = None  # or the pool size in blocks

    def __post_init__(self):
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {self.max_batch_size!r}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2, got {self.max_seq_len!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 2:
            raise ValueError(f"kv_cache_blocks must be >= 2 (one block is scratch), got {self.kv_cache_blocks}")


@dataclass(frozen=True)
class PassConfig:
    """Which graph passes run. Names are those of :mod:`pdcompile.passes` pipelines."""

    disabled: frozenset[str] = field(default_factory=frozenset)

    def enabled(self, name: str) -> bool:
        return name not in self.disabled


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the linear layers (the quantize_weights pass).

    bits: 8 or 4. group_size: weights per scale along in_features; a power of two >= 16
        (ONNX Runtime's MatMulNBits) that divides every quantized layer's in_features.
        32 by default: it divides the dimensions of every model this project measures
        (SmolLM2's hidden size 576 is no multiple of 64 or 128), it is the group of
        llama.cpp's Q8_0/Q4_0 and ONNX Runtime GenAI's default block, and a group's fp32
        scale adds 1 bit per weight (1.25 bytes per int8 weight, 0.625 per int4).
    symmetric: codes centred on 2 ** (bits - 1) with no zero points stored; asymmetric
        groups store a zero point each and spend all 2 ** bits codes on [min, max].
    lm_head: quantize the output projection too. On by default: it is the largest
        matrix (21% of SmolLM2's weight bytes, 30% of R1's) and decode reads it every
        step; llama.cpp Q8_0 and ONNX Runtime GenAI int4 quantize it as well. Its error
        shows in the logits directly: benchmarks/accuracy.py measures both settings.
    lm_head_bits: the output projection's bits when it is quantized, 8 by default whatever
        ``bits`` says: with 4-bit layers SmolLM2's perplexity is +28% over fp32 with a 4-bit
        lm_head and +17% with an 8-bit one (BENCHMARKS.md, 2026-12-07), for 14 MB more read
        per decode step. llama.cpp's 4-bit formats keep the output tensor at 6 bits for the
        same reason. Set it to 4 for the smallest file.
    narrowing_bits: the bits of every linear layer with fewer outputs than inputs, 8 by
        default whatever ``bits`` says: the MLP's down projection, and the key and value
        projections of a grouped-query attention model. Kept at 8 bits under int4,
        SmolLM2's perplexity is +8.6% over fp32 instead of +16.6% (BENCHMARKS.md,
        2026-12-07), for 25% more bytes read per decode step in its layers. llama.cpp's
        default 4-bit mix (Q4_K_M) gives its value and down projections more bits too;
        on SmolLM2 the key projection mattered as much as the value one. Set it to 4 for
        plain int4.
    prefill: "quantized" (the quantized op, as decode) or "dequantized" (prefill's
        linears read fp32 weights dequantized from the same codes once, so both phases
        use the same weights and prefill keeps dense fp32 matmuls (fp32 activations,
        whatever prefill_accuracy_level says), at 4 bytes per
        weight more memory). Applies to prefill, extend and score graphs.
    prefill_accuracy_level / decode_accuracy_level: the activations' precision per phase,
        ONNX Runtime's MatMulNBits ``accuracy_level``: 4 (the default) rounds each group of
        ``group_size`` activations to int8 before the dot products, 0 keeps them fp32. Every
        backend computes the same function (onnxruntime natively, the others by rounding in
        aten ops), so backends agree with each other at either level. Measured with ONNX
        Runtime 1.32 on an AVX2 CPU (BENCHMARKS.md, 2026-12-04): at 4 the 8-bit decode GEMV
        is 39x faster than at 0, the 4-bit one 3.2x, and an 8-bit 128-row prefill 1.5x;
        SmolLM2's int8 perplexity is +0.67% over fp32 at 4, +0.22% at 0. ONNX Runtime
        GenAI's model builder and llama.cpp's Q8_0/Q4 dot products also round activations
        to int8. Level 0 is the exact weight-only reference. Off CPU (where ONNX Runtime's
        kernels for level 4 are not verified here) the graphs use 0 whatever this says.
    """

    bits: int = 8
    group_size: int = 32
    symmetric: bool = True
    lm_head: bool = True
    lm_head_bits: int = 8
    narrowing_bits: int = 8
    prefill: str = "quantized"
    prefill_accuracy_level: int = 4
    decode_accuracy_level: int = 4

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 (weights='int8' or 'int4'), got {self.bits!r}")
        for name in ("lm_head_bits", "narrowing_bits"):
            if getattr(self, name) not in (4, 8):
                raise ValueError(f"{name} must be 4 or 8, got {getattr(self, name)!r}")
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g & (g - 1):
            raise ValueError(f"group_size must be a power of two >= 16 (ONNX Runtime MatMulNBits), got {g!r}")
        if self.prefill not in ("quantized", "dequantized"):
            raise ValueError(f"prefill must be 'quantized' or 'dequantized', got {self.prefill!r}")
        for name in ("prefill_accuracy_level", "decode_accuracy_level"):
            if getattr(self, name) not in (0, 4):
                raise ValueError(f"{name} must be 0 (fp32 activations) or 4 (int8 activations per group; "
                                 f"MatMulNBits accuracy_level), got {getattr(self, name)!r}")

    @classmethod
    def parse(cls, weights) -> "QuantConfig | None":
        """``optimize(weights=...)``: None / "fp32" (no quantization), "int8", "int4", a
        QuantConfig, or a preset with some fields changed, ``"int4:narrowing_bits=4,group_size=64"``
        (what the command line's ``--weights`` takes)."""
        if weights is None or isinstance(weights, cls):
            return weights
        presets = {"fp32": None, "int8": 8, "int4": 4}
        preset, _, changes = weights.partition(":") if isinstance(weights, str) else (weights, "", "")
        if preset not in presets:
            raise ValueError(f"weights must be 'int8', 'int4', 'fp32', None, a QuantConfig or 'int4:field=value,...', "
                             f"got {weights!r}")
        if presets[preset] is None:
            if changes:
                raise ValueError(f"fp32 weights take no quantization fields, got {weights!r}")
            return None
        defaults = {f.name: f.default for f in fields(cls) if f.name != "bits"}
        values = {"bits": presets[preset]}
        for item in filter(None, changes.split(",")):
            name, eq, value = (part.strip() for part in item.partition("="))
            if not eq or name not in defaults:
                raise ValueError(f"weights={weights!r}: {item!r} is not field=value with a field of "
                                 f"QuantConfig: {sorted(defaults)}")
            default = defaults[name]
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"weights={weights!r}: {name} takes true or false, got {value!r}")
                values[name] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                try:
                    values[name] = int(value)
                except ValueError:
                    raise ValueError(f"weights={weights!r}: {name} takes an integer, got {value!r}") from None
            else:
                values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything :func:`pdcompile.optimize` needs besides the model."""

    backend: str | None = None  # None: the default backend for the model's device
    cache: CacheConfig = field(default_factory=CacheConfig)
    passes: PassConfig = field(default_factory=PassConfig)
    # the backend's own frozen options (e.g. backends.onnxruntime.OrtOptions); None: its defaults
    backend_options: object | None = None
    quant: QuantConfig | None = None  # weight-only int8/int4; None: the model's weights as they are
    # The dtype prefill's linear layers compute in (also the extend and score graphs): "float32"
    # or "bfloat16" (the bf16_matmuls pass). bfloat16 pays on CPUs with AVX-512 BF16 or AMX,
    # where prefill is several times faster (BENCHMARKS.md); elsewhere optimize() keeps float32
    # and logs why. Decode keeps the model's dtype: it is bound by the bytes it reads.
    prefill_dtype: str = "float32"

    def __post_init__(self):
        aliases = {"bf16": "bfloat16", "fp32": "float32", torch.bfloat16: "bfloat16", torch.float32: "float32"}
        object.__setattr__(self, "prefill_dtype", aliases.get(self.prefill_dtype, self.prefill_dtype))
        if self.prefill_dtype not in PREFILL_DTYPES:
            raise ValueError(f"prefill_dtype must be one of {', '.join(PREFILL_DTYPES)}, got {self.prefill_dtype!r}")


PREFILL_DTYPES = ("float32", "bfloat16")
