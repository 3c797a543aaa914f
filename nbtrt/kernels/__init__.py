"""nbtrt's own GPU kernels, and the one rule of when each is taken.

Each module here is a kernel (or its compiler) registered as a ``torch.ops.nbtrt`` custom op, so
compiled graphs call it and CUDA graphs capture it; none of them knows a model. Where one cannot
run (no GPU, no Triton, no NVRTC) its ``takes`` / ``unavailable_reason`` says so and the caller
keeps PyTorch's path. The torch runtime's quantized linears (:mod:`nbtrt.runtimes.torch_linears`)
apply this table; rows are the tokens of all sequences in one call (decode at batch B: B rows;
a prefill: the prompt's tokens).

Which kernel a weight-only linear takes on CUDA, by rows (bf16 activations)
=======================  =================================================  ===========================
rows                     INT8 weight-only (``int8_wo``)                     INT4 (``int4_wo``, ``int4_awq``)
=======================  =================================================  ===========================
1 (batch-1 decode)       Inductor's fused dequantize + GEMV (compiled)      :mod:`cuda_int4` (NVRTC) [1]_
2 .. 8                   :mod:`cuda_int8` (NVRTC) [2]_                      :mod:`cuda_int4` (NVRTC) [1]_
9 .. MANY_ROWS - 1       :mod:`triton_int8`                                 :mod:`cuda_int4`, 8 rows a launch [1]_
MANY_ROWS .. 128         dequantize in the graph, then cuBLAS               :mod:`triton_int4` [3]_
more                     dequantize in the graph, then cuBLAS               ``int4_dequantize`` + cuBLAS
=======================  =================================================  ===========================

.. [1] where NVRTC cannot compile it or the shape does not fit: tinygemm (``_weight_int4pack_mm``)
   below ``MANY_ROWS`` and for many one-token rows; a prefill of ``MANY_ROWS`` or more
   dequantizes for cuBLAS.
.. [2] a gated MLP's gate and up run as one launch (``int8_gated_mm``; INT4: ``int4_gated_mm``).
.. [3] ``INT4_TRITON_MAX_ROWS``; only in nbtrt's INT4 layout (where :mod:`cuda_int4` runs).

Other formats: W8A8 (``int8_sq``) is ``torch._int_mm`` (cuBLASLt), FP8 ``torch._scaled_mm``, at
every row count. Decode attention (one new token a sequence) is :mod:`triton_attention`'s
flash-decoding kernels on CUDA over the static cache, and :mod:`paged_attention`'s over the
serving runtime's paged block pool (:mod:`nbtrt.serving.runner`); prefill is SDPA. Off CUDA every
path is PyTorch's.

:mod:`nvrtc` compiles the CUDA C kernels at run time; :mod:`inductor_timing` has Inductor time
its autotuning candidates on the GPU alone (no host launch in the figure).
"""

# From this many rows weight-only linears on CUDA leave the few-row kernels (table above).
# Measured on an H100, 8B config: docs, "Quantized linears by rows".
MANY_ROWS = 64
# INT4 calls of MANY_ROWS up to this many rows take the Triton kernel that reads the packed weight
# (triton_int4), more dequantize it for cuBLAS. On an H100 the 8B shapes' 128-row calls took the
# same GPU time either way within 0.85-1.25x, 512 rows 1.5-2.6x as long in Triton, and the kernel
# saves the host the dequantization op's call (a short prefill is bound by the host).
INT4_TRITON_MAX_ROWS = 128
