// The persistent LSTM / GRU kernels (csrc/rnn_persist.cuh) and their cooperative launcher. Each kernel loops
// over the steps; between steps a grid-wide barrier on a global arrival counter (release by the arriving
// CTA's red.release, acquire by the waiting ld.acquire), bounded in time: a barrier that cannot complete (CTAs not
// co-resident) sets the error flag and every CTA leaves; a one-thread kernel queued behind it then raises a
// device-side assert with the reason, so the launch fails loudly (the host's next CUDA call raises, as for
// torch's own device asserts) instead of leaving stale numbers, and the host never waits for the kernel: the
// layers stay asynchronous, and CUDA graphs capture both launches. The grid is checked against
// cudaOccupancyMaxActiveBlocksPerMultiprocessor before launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "launch.h"
#include "half.cuh"
#include "philox.cuh"
#include "rnn_persist.cuh"

namespace fusenn {
namespace persist {

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The arrival: the CTA's writes before it (ordered before thread 0's by the __syncthreads ahead) released at GPU
// scope with the add itself, which returns nothing: MEMBAR.ALL.GPU and REDG in SASS, where __threadfence and
// atomicAdd take a sequentially consistent MEMBAR.SC.GPU and wait for the old value.
__device__ __forceinline__ void add_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Every CTA has arrived `target` times in all (target = barriers passed x grid, modulo 2^32: see arrived()). False,
// in every thread of the CTA, when the barrier timed out here or another CTA reported a failure: the caller leaves
// the kernel. The load that sees every arrival acquires the other CTAs' released writes, and the __syncthreads
// after it passes them on to the CTA's threads (causality order is transitive), as for libcu++'s device-scope
// barriers: no fence on the way out.
__device__ __forceinline__ bool grid_barrier(const Args& a, unsigned target) {
  __shared__ int failed;
  __syncthreads();  // the CTA's writes of this step are done
  if (threadIdx.x == 0) {
    add_release(a.barrier, 1u);
    int bad = 0;
    const unsigned long long start = now_ns();
    while (!arrived(load_acquire(a.barrier), target)) {
      if (*reinterpret_cast<volatile int*>(a.error) != 0) {
        bad = 1;
        break;
      }
      if (now_ns() - start > a.timeout_ns) {
        atomicExch(a.error, 1);
        bad = 1;
        break;
      }
      __nanosleep(32);
    }
    failed = bad;
  }
  __syncthreads();
  return failed == 0;
}

// Step inputs fetched into L2 ahead of their step, while the CTA waits at the barrier before it: its rows of `rows`
// rows `ld` bytes apart from `base`, `width` bytes each (every 128-byte line of them), one row a thread. The cells
// read them after the step's products, on the step's critical path: from L2, not from HBM (where the input GEMM's
// output and the saved states have gone by then). No L1 prefetch: the barrier's acquire invalidates L1.
__device__ __forceinline__ void prefetch_rows(const void* base, int64_t rows, int64_t ld, int64_t width, int tid) {
#pragma unroll 1
  for (int64_t r = tid; r < rows; r += kThreads) {
    const char* p = static_cast<const char*>(base) + r * ld;
    const char* end = p + width;
#pragma unroll 1
    for (const char* line = p - (reinterpret_cast<uintptr_t>(p) & 127); line < end; line += 128) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(line)));
    }
  }
}

// What the forward's cells of the k-th step processed read from memory that no step writes: gx_t's gate columns of
// the CTA's units (rows (b, q) H apart).
template <class T>
__device__ __forceinline__ void prefetch_forward(const Args& a, int64_t cta, int64_t k, int tid) {
  const int64_t t = a.reverse ? a.T - 1 - k : k, j0 = cta * a.units, e = sizeof(T);
  prefetch_rows(static_cast<const T*>(a.gx) + t * a.B * a.gates * a.H + j0, a.B * a.gates, a.H * e,
                units_of(a, cta) * e, tid);
}

// Likewise the backward's: gx_t and gh_t (h_{t-1} W_hh^T) for the CTA's units, the saved cell states around step t
// (LSTM), and dy_t's columns of those units (without a projection, where they are h's columns).
template <class T>
__device__ __forceinline__ void prefetch_backward(const Args& a, int64_t cta, int64_t k, int tid) {
  const int64_t t = a.reverse ? k : a.T - 1 - k, j0 = cta * a.units, e = sizeof(T), B = a.B, G = a.gates, H = a.H;
  const int64_t width = units_of(a, cta);
  prefetch_rows(static_cast<const T*>(a.gx) + t * B * G * H + j0, B * G, H * e, width * e, tid);
  prefetch_rows(a.ghs + t * B * G * H + j0, B * G, H * 4, width * 4, tid);
  if (G == 4) {
    int64_t before, after;
    slots(t, k, a.reverse, true, &before, &after);
    prefetch_rows(a.cs + before * B * H + j0, B, H * 4, width * 4, tid);
    prefetch_rows(a.cs + after * B * H + j0, B, H * 4, width * 4, tid);
  }
  if (!a.proj) prefetch_rows(static_cast<const T*>(a.dy) + t * B * a.P + j0, B, a.P * e, width * e, tid);
}

// A CTA's shared memory as the plan lays it out (Layouts): its weight slices (kept for the whole sequence; the
// second only with a projection), the staged operand, the fp32 accumulators; the slices are loaded here,
// before the first step.
template <class T>
struct Slice {
  T* w;
  T* w2;
  T* st;
  float* acc;
};

template <class T>
__device__ __forceinline__ Slice<T> load_slice(unsigned char* smem, const Args& a, bool backward, const Layout& l,
                                               const Layout& l2) {
  const Slice<T> s{reinterpret_cast<T*>(smem + l.w_off), reinterpret_cast<T*>(smem + l2.w_off),
                   reinterpret_cast<T*>(smem + l.a_off), reinterpret_cast<float*>(smem + l.acc_off)};
  const int tid = static_cast<int>(threadIdx.x);
  load_weights<T>(source_of(a, backward, false, blockIdx.x), s.w, l, tid, kThreads);
  if (a.proj) load_weights<T>(source_of(a, backward, true, blockIdx.x), s.w2, l2, tid, kThreads);
  __syncthreads();
  return s;
}

// Each step ends in a grid barrier (two with a projection: after m_t, after h_t), but for the last.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) persist_forward_kernel(const Args a, const Layout l, const Layout l2) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t cta = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  if (a.T > 0) prefetch_forward<T>(a, cta, 0, tid);
  const auto [w, w2, st, acc] = load_slice<T>(smem, a, false, l, l2);
  unsigned barriers = 0;
  for (int64_t k = 0; k < a.T; ++k) {
    forward_step<T>(a, cta, k, w, st, acc, l, tid, kThreads);
    if (k + 1 < a.T) prefetch_forward<T>(a, cta, k + 1, tid);
    if (a.proj) {
      if (!grid_barrier(a, ++barriers * gridDim.x)) return;
      forward_project<T>(a, cta, k, w2, st, acc, l2, tid, kThreads);
    }
    if (k + 1 < a.T && !grid_barrier(a, ++barriers * gridDim.x)) return;
  }
}

// Per step: dh_t's recurrent part from the previous step's dgates, then (with a projection: dh's share reaching
// h_new, a barrier, dm_t) the cells' gradients, a barrier.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) persist_backward_kernel(const Args a, const Layout l, const Layout l2) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t cta = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  if (a.T > 0) prefetch_backward<T>(a, cta, 0, tid);
  const auto [w, w2, st, acc] = load_slice<T>(smem, a, true, l, l2);
  unsigned barriers = 0;
  for (int64_t k = 0; k < a.T; ++k) {
    if (k + 1 < a.T) prefetch_backward<T>(a, cta, k + 1, tid);  // its cells' inputs, while this step runs
    if (k > 0) backward_recurrent<T>(a, cta, k - 1, w, st, acc, l, tid, kThreads);
    if (a.proj) {
      backward_dh<T>(a, cta, k, tid, kThreads);
      if (!grid_barrier(a, ++barriers * gridDim.x)) return;
    }
    backward_cells<T>(a, cta, k, w2, st, acc, l2, tid, kThreads);
    if (!grid_barrier(a, ++barriers * gridDim.x)) return;
  }
  if (a.T > 0) backward_recurrent<T>(a, cta, a.T - 1, w, st, acc, l, tid, kThreads);
}

// Queued behind each persistent launch: a device-side assert where one of its grid barriers timed out. Apart
// from the kernels, so that the assert's call (an ABI call, ~10-25 more registers) stays out of their step loop.
__global__ void persist_check_kernel(const int* error) {
  if (*reinterpret_cast<const volatile int*>(error) != 0) {
    // glibc's name for the assert hook that CUDA's device code provides (torch's CUDA_KERNEL_ASSERT calls it too)
    __assert_fail(
        "fusenn's persistent RNN kernel: a grid-wide barrier timed out, its CTAs were not all resident "
        "(FUSENN_PERSIST_TIMEOUT_S sets the bound); its results are invalid",
        __FILE__, __LINE__, __func__);
  }
}

const void* kernel_of(Dtype dtype, bool backward) {
  switch (dtype) {
    case Dtype::f16:
      return backward ? reinterpret_cast<const void*>(persist_backward_kernel<__half>)
                      : reinterpret_cast<const void*>(persist_forward_kernel<__half>);
    case Dtype::bf16:
      return backward ? reinterpret_cast<const void*>(persist_backward_kernel<__nv_bfloat16>)
                      : reinterpret_cast<const void*>(persist_forward_kernel<__nv_bfloat16>);
    default:
      return backward ? reinterpret_cast<const void*>(persist_backward_kernel<float>)
                      : reinterpret_cast<const void*>(persist_forward_kernel<float>);
  }
}

int elem_of(Dtype dtype) { return dtype == Dtype::f32 ? 4 : 2; }

// The plan for the current device and the kernel's registers, confirmed by the occupancy API; *why says
// what stops it (empty when nothing does); *failed, whether a CUDA query failed. Kept per device and arguments
// (device_plan), so that a launch costs the host no queries after the first.
Plan plan_on(int device, Dtype dtype, int gates, bool backward, int64_t H, int64_t P, int64_t grid_req, bool tf32,
             int64_t B, int64_t max_tiles, std::string* why, bool* failed) {
  Plan p{};
  int coop = 0;
  int v[6] = {0, 0, 0, 0, 0, 0};
  const cudaDeviceAttr attrs[6] = {
      cudaDevAttrMultiProcessorCount,           cudaDevAttrMaxSharedMemoryPerBlockOptin,
      cudaDevAttrMaxSharedMemoryPerMultiprocessor, cudaDevAttrMaxRegistersPerMultiprocessor,
      cudaDevAttrMaxThreadsPerMultiProcessor,   cudaDevAttrMaxBlocksPerMultiprocessor};
  cudaError_t e = cudaSuccess;
  for (int i = 0; i < 6 && e == cudaSuccess; ++i) e = cudaDeviceGetAttribute(&v[i], attrs[i], device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  const void* fn = kernel_of(dtype, backward);
  cudaFuncAttributes fa{};
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, fn);
  if (e != cudaSuccess) {
    *why = std::string("querying the device for the persistent kernel failed: ") + cudaGetErrorString(e);
    *failed = true;
    return p;
  }
  if (!coop) {
    *why = "the device does not support cooperative launches";
    return p;
  }
  const Machine m{v[0], v[1], v[2], v[3], v[4], v[5]};
  p = plan(gates, backward, elem_of(dtype), H, P, m, fa.numRegs, static_cast<int64_t>(fa.sharedSizeBytes),
           grid_req, tf32, B, max_tiles);
  if (!p.why.empty()) {
    *why = p.why;
    return p;
  }
  // the most any plan may take (not this plan's: the attribute is the kernel's, shared by every cached plan)
  e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(m.smem_block - static_cast<int64_t>(fa.sharedSizeBytes)));
  int per_sm = 0;
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kThreads, p.smem);
  if (e != cudaSuccess) {
    *why = std::string("the occupancy query for the persistent kernel failed: ") + cudaGetErrorString(e);
    *failed = true;
  } else if (static_cast<int64_t>(per_sm) * m.sms < p.grid) {
    *why = "the persistent kernel needs " + std::to_string(p.grid) + " co-resident CTAs of " + std::to_string(p.smem) +
           " bytes of shared memory; the occupancy API allows " + std::to_string(per_sm) + " per SM x " +
           std::to_string(m.sms) + " SMs";
  }
  return p;
}

Plan device_plan(Dtype dtype, int gates, bool backward, int64_t H, int64_t P, int64_t grid_req, bool tf32,
                 int64_t B, int64_t max_tiles, std::string* why) {
  int device = 0;
  const cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) {
    *why = std::string("querying the device for the persistent kernel failed: ") + cudaGetErrorString(e);
    return Plan{};
  }
  using Key = std::tuple<int, int, int, bool, int64_t, int64_t, int64_t, bool, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, std::pair<Plan, std::string>> plans;
  const Key key{device, static_cast<int>(dtype), gates, backward, H, P, grid_req, tf32, B, max_tiles};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = plans.find(key);
    if (it != plans.end()) {
      *why = it->second.second;
      return it->second.first;
    }
  }
  bool failed = false;
  const Plan p = plan_on(device, dtype, gates, backward, H, P, grid_req, tf32, B, max_tiles, why, &failed);
  if (!failed) {  // a failed query is not kept: the next call asks again
    const std::lock_guard<std::mutex> lock(mutex);
    plans.emplace(key, std::make_pair(p, *why));
  }
  return p;
}

}  // namespace persist

int persist::launch_persist(const Args& args, Dtype dtype, bool backward, int64_t grid_req, int64_t max_tiles,
                            Stream stream, std::string* why) {
  why->clear();
  const Plan p = device_plan(dtype, args.gates, backward, args.H, args.proj ? args.P : 0, grid_req, args.tf32, args.B,
                             max_tiles, why);
  if (!why->empty()) return 0;
  Args a = args;
  a.grid = static_cast<int32_t>(p.grid);
  a.units = static_cast<int32_t>(p.units);
  a.chunk = static_cast<int32_t>(p.chunk);
  a.vrows = static_cast<int32_t>(p.vrows);
  a.tiles = static_cast<int32_t>(p.tiles);
  a.tf32 = p.tf32;
  Layouts ls = layouts_for(a.gates, backward, elem_of(dtype), a.H, a.proj ? a.P : 0, a.units, a.vrows, a.chunk, a.tf32,
                           a.tiles);
  void* params[] = {&a, &ls.a, &ls.b};
  cudaError_t e = cudaLaunchCooperativeKernel(kernel_of(dtype, backward), dim3(static_cast<unsigned>(p.grid)),
                                              dim3(kThreads), params, static_cast<size_t>(p.smem), stream);
  if (e != cudaSuccess) return static_cast<int>(e);
  persist_check_kernel<<<1, 1, 0, stream>>>(a.error);
  return static_cast<int>(cudaGetLastError());
}

std::string persist::persist_reason(Dtype dtype, int gates, bool backward, int64_t H, int64_t P, int64_t grid_req) {
  std::string why;
  device_plan(dtype, gates, backward, H, P, grid_req, false, 0, 0, &why);  // TF32 or not, any batch: a grid launches
  return why;
}

}  // namespace fusenn
