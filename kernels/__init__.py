"""Custom ops of the ``lowbit`` ONNX domain.

``reference.py`` specifies them (NumPy oracle), ``packing.py`` lays out the codes, ``model.py`` builds
one-node models; the C++ (``cpu/``) and CUDA (``cuda/``) kernels are compiled by ``build.py`` into
``liblowbit_ops.so``, which ``_lib.py`` finds and ``lowbit.runtime.session`` registers.
"""
