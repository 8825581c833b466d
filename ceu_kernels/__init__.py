"""The backends behind ceu's fused losses, and the kernels they launch. The lower layer: nothing here imports ``ceu``.

* ``contract``: what every backend provides (the four functions and their conventions), the name registry
  (``load("torch" | "triton" | "cuda")``) and the helpers the backends share.
* ``chunked``: the token-chunked PyTorch backend (also the CPU path).
* ``lmf_forward``, ``lmf_backward``, ``ce_forward``, ``ce_backward``: the Triton kernels, each with its launcher,
  which is the Triton backend's function of that name; ``tl_utils``: what they share.
* ``cuda``: the cuBLAS + CUDA C++ backend (the extension ``ceu_kernels._C``, built from ``csrc/``).
* ``compile_check``: compiles every Triton launch ahead of time for sm_90 and sm_80.
"""
