// VisualTokenSelect on the GPU: the C interface of the CUDA kernels (kernel.cu).
//
// The TensorRT plugin (plugin.cpp) and the Python GPU tests (cuda.py, through ctypes) both call it. Every
// method of the reference runs here with the reference's rules: fp32 math whatever the input dtype, ties to
// the lower index, NaN scores ranked last, output [B, keep] int64 ascending. Everything is enqueued on the
// caller's stream into the caller's workspace: no allocation, no host synchronization, and the launch
// sequence depends only on the parameters, so it can be captured in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h" // IwpVtsParams, the method, dtype and input enums, IWP_VTS_ABI_VERSION (generated)

// The inputs, in the contract's order (IwpVtsInput), are all contiguous device pointers:
// hidden [B,T,D], q [B,Hq,T,d], k [B,Hkv,T,d], q_rot, k_rot, v (activations, `dtype`); key_mask [B,T] int32;
// visual_start [B] int64; query_idx [B,Q] int64; query_mask [B,Q] int32; last_idx [B] int64;
// visual_xy [B,N,2] float32; ttv [B,N] float32.
extern "C"
{

int32_t iwpVtsAbiVersion();

// sizeof(IwpVtsParams), so a binding can check its mirror of the struct.
size_t iwpVtsParamsSize();

// The method id of a method name (as in contract.py), or -1.
int32_t iwpVtsMethodId(char const* name);

// 0 if the parameters are valid; otherwise 1 and a one-line reason in `message` (truncated to `capacity`).
int32_t iwpVtsValidate(IwpVtsParams const* params, char* message, size_t capacity);

// Bytes of workspace iwpVtsEnqueue needs for these parameters (the layout depends on them only).
size_t iwpVtsWorkspaceSize(IwpVtsParams const* params);

// Enqueue the selection on `stream` (a cudaStream_t). `indices` is [B, keep] int64 on the device; the
// workspace must hold iwpVtsWorkspaceSize bytes and be 256-byte aligned. Returns a cudaError_t (0 = success),
// or -1 for invalid parameters.
int32_t iwpVtsEnqueue(IwpVtsParams const* params, void const* const* inputs, int64_t* indices, void* workspace,
    void* stream);

} // extern "C"
