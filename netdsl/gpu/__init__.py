"""GPU graph mode: the training iteration compiled to CUDA kernels and replayed as one CUDA graph.

lower (Plan -> Program of launches) -> program (arena by liveness, GEMM tiling) -> codegen (CUDA C)
-> runtime (CuPy: buffers, capture, replay) -> loop (the Trainer's chunked solver loop). emulate runs
the same Programs with NumPy, the CPU oracle. CuPy is reached only through netdsl.backend.
"""
