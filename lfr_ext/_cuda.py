"""Facts about PyTorch's CUDA runtime that several modules rely on."""

# What torch.cuda.set_sync_debug_mode("error") raises, as a RuntimeError, on a call that
# synchronises the host with the GPU (c10/cuda/CUDAFunctions.h: warn_or_error_on_sync).
SYNC_ERROR = "called a synchronizing CUDA operation"


def is_host_sync_error(error: BaseException) -> bool:
    """Whether ``error`` is the sync-debug mode refusing a host synchronisation."""
    return isinstance(error, RuntimeError) and SYNC_ERROR in str(error)
