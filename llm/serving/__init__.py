"""The GPU serving engine: the decoder, continuous batching and the `fast` and `nf4` modes with
their kernels (Triton, and the CUDA C++ `nf4` decode kernel).

`llm` hands it plain values (a loaded model, sizes, a device); it knows nothing of Slack.
"""
