"""Serving an artifact: a Triton Inference Server model repository (``repository.py``) and the
``tritonserver`` that ``nvidia-pytriton`` bundles, started on it (``server.py``)."""
