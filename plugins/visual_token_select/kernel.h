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

extern "C"
{

// Bumped with any change to IwpVtsParams or to the selection's results.
#define IWP_VTS_ABI_VERSION 1

enum IwpVtsMethod : int32_t
{
    kIwpVtsIwp = 0,
    kIwpVtsFastV = 1,
    kIwpVtsDart = 2,
    kIwpVtsDivPrune = 3,
    kIwpVtsRandom = 4,
    kIwpVtsTransPrune = 5,
    kIwpVtsBtp = 6,
};

// Element type of the activations (hidden, q, k, q_rot, k_rot, v); the other inputs have fixed types.
enum IwpVtsDtype : int32_t
{
    kIwpVtsFloat32 = 0,
    kIwpVtsFloat16 = 1,
    kIwpVtsBFloat16 = 2,
};

// Shapes, the node's core attributes and the method's options (those of other methods are ignored).
struct IwpVtsParams
{
    int32_t method;        // IwpVtsMethod
    int32_t dtype;         // IwpVtsDtype
    int64_t batch;         // B
    int64_t tokens;        // T
    int64_t width;         // D of hidden
    int64_t queryHeads;    // Hq
    int64_t kvHeads;       // Hkv
    int64_t headDim;       // d
    int64_t visual;        // N
    int64_t queries;       // Q, the columns of query_idx
    int64_t keep;          // K
    int64_t stage;
    int64_t nStages;
    // method options, as in the methods' Config dataclasses
    double lam;            // iwp
    int64_t chunk;         // iwp, btp
    double growth;         // iwp, btp
    int32_t queriesLast;   // iwp: 1 for queries="last", 0 for "instruction"
    int32_t rebalance;     // btp
    int64_t pivots;        // dart
    int64_t seed;          // random
    double alpha;          // transprune
    double attentionFirst; // btp
    double attentionLast;  // btp
    double seedFraction;   // btp
};

// The 13 inputs, in the contract's order (contract.INPUTS), all contiguous device pointers:
// hidden [B,T,D], q [B,Hq,T,d], k [B,Hkv,T,d], q_rot, k_rot, v (activations, `dtype`); key_mask [B,T] int32;
// visual_start [B] int64; query_idx [B,Q] int64; query_mask [B,Q] int32; last_idx [B] int64;
// visual_xy [B,N,2] float32; ttv [B,N] float32.
enum IwpVtsInput : int32_t
{
    kIwpVtsHidden = 0,
    kIwpVtsQ,
    kIwpVtsK,
    kIwpVtsQRot,
    kIwpVtsKRot,
    kIwpVtsV,
    kIwpVtsKeyMask,
    kIwpVtsVisualStart,
    kIwpVtsQueryIdx,
    kIwpVtsQueryMask,
    kIwpVtsLastIdx,
    kIwpVtsVisualXy,
    kIwpVtsTtv,
    kIwpVtsNumInputs
};

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
