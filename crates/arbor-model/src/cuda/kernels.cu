// Arbor's CUDA kernels: what candle lacks for a slot-pool KV cache.
//
//   arbor_qkv_rope_write  split a fused QKV projection, apply RoPE at each token's position,
//                         write K and V into their slots of the layer's pool, emit Q.
//   arbor_attention       attention of each query row over its sequence's slot list (causal),
//                         online softmax, split along the keys; partial results per split.
//   arbor_attention_merge combine the splits of each (row, head).
//   arbor_silu_mul        SwiGLU activation on the fused gate/up projection.
//
// Layouts (row-major): q [T, H, D]; pools [slots, KVH, D]; all activations bf16, softmax and
// accumulation in f32. D (head_dim) is even and at most 256; lane l of a warp holds elements
// l, l + 32, ... of a head.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#define WARP 32
#define MAX_PER_LANE 8  // D <= 256
#define VEC_MAX 16      // K rows of up to 128 bf16 read as 16-byte vectors

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Programmatic dependent launch (Hopper): a kernel launched as a programmatic dependent
// (`launch_pdl` in ops.rs) may start while the kernel before it still runs; it must wait
// (pdl_wait) before reading that kernel's outputs. A kernel lets its dependents start early
// with pdl_launch_dependents. Both are no-ops where no such launch is involved, and compile
// to nothing before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// Keys per split of one row. split_len > 0: every row's splits are that long (steps planned
// on the host for their longest context). 0: the row cuts its own n_keys into n_splits pieces
// of whole stages, so a launch whose shape is fixed (a CUDA graph replayed while contexts
// grow) still spreads each row over all its splits.
__device__ __forceinline__ int row_split_len(int split_len, int n_keys, int n_splits, int stage) {
    if (split_len > 0) return split_len;
    const int per = (n_keys + n_splits - 1) / n_splits;
    return max(stage, (per + stage - 1) / stage * stage);
}

// One thread per (token, rotated pair or copied element).
// qkv: [T, (H + 2*KVH) * D]; cos/sin: [max_pos, D/2] f32; positions, slots: [T].
// interleaved: pairs (2i, 2i+1) (GGUF Llama); else halves (i, i + D/2) (Hugging Face).
// The pools hold KV elements: bf16, or FP8 E4M3 bytes (rounded to nearest, saturating at
// +-448, no scale: vLLM's `--kv-cache-dtype fp8` without calibrated scales).
template <typename KV>
__device__ __forceinline__ KV to_kv(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 to_kv<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ uint8_t to_kv<uint8_t>(float x) {
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

template <typename KV>
__device__ __forceinline__ void qkv_rope_write(
    const __nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ positions,
    const uint32_t* __restrict__ slots, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ q_out, KV* __restrict__ k_pool,
    KV* __restrict__ v_pool, int T, int H, int KVH, int D, int interleaved) {
    const int half = D / 2;
    const int heads = H + 2 * KVH;
    const long per_token = (long)heads * half;  // work items per token (pairs)
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * per_token) return;
    const int t = idx / per_token;
    const int rem = idx % per_token;
    const int head = rem / half;
    const int i = rem % half;
    const __nv_bfloat16* row = qkv + (long)t * heads * D + (long)head * D;
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    float x0 = __bfloat162float(row[a]);
    float x1 = __bfloat162float(row[b]);
    if (head < H + KVH) {  // Q and K are rotated
        const uint32_t pos = positions[t];
        const float c = cos_t[(long)pos * half + i], s = sin_t[(long)pos * half + i];
        const float r0 = x0 * c - x1 * s;
        const float r1 = x0 * s + x1 * c;
        x0 = r0;
        x1 = r1;
    }
    if (head < H) {
        __nv_bfloat16* dst = q_out + (long)t * H * D + (long)head * D;
        dst[a] = __float2bfloat16(x0);
        dst[b] = __float2bfloat16(x1);
        return;
    }
    KV* dst = head < H + KVH ? k_pool + (long)slots[t] * KVH * D + (long)(head - H) * D
                             : v_pool + (long)slots[t] * KVH * D + (long)(head - H - KVH) * D;
    dst[a] = to_kv<KV>(x0);
    dst[b] = to_kv<KV>(x1);
}

#define QKV_ROPE_WRITE(NAME, KV)                                                                \
    extern "C" __global__ void NAME(                                                            \
        const __nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ positions,          \
        const uint32_t* __restrict__ slots, const float* __restrict__ cos_t,                    \
        const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ q_out,                     \
        KV* __restrict__ k_pool, KV* __restrict__ v_pool, int T, int H, int KVH, int D,         \
        int interleaved) {                                                                      \
        qkv_rope_write<KV>(qkv, positions, slots, cos_t, sin_t, q_out, k_pool, v_pool, T, H,   \
                           KVH, D, interleaved);                                                \
    }
QKV_ROPE_WRITE(arbor_qkv_rope_write, __nv_bfloat16)
QKV_ROPE_WRITE(arbor_qkv_rope_write_fp8, uint8_t)

// Decode rows (and any row not in a prefill tile): one warp per (query row, head, split),
// rows[blockIdx.x] naming the row. Row r attends keys [0, row_keys[r]) of the slot list
// starting at row_slot_off[r]; this split takes keys [split * split_len, ...). Writes the
// unnormalized output, the running max and the sum of exponentials of its keys.
//
// Keys go 32 at a time, one per lane: each lane gathers its key's slot and K row and scores it
// (32 independent memory streams instead of one dependent chain per key, which left decode
// waiting on memory latency), then the warp folds the 32 scores into the online softmax and
// every lane accumulates its D/32 output dims over the 32 V rows (coalesced across lanes).
extern "C" __global__ void arbor_attention(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const uint32_t* __restrict__ slots,
    const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_keys,
    const uint32_t* __restrict__ rows, float* __restrict__ o_part, float* __restrict__ m_part,
    float* __restrict__ l_part, int H, int KVH, int D, int n_splits, int split_len, float scale) {
    __shared__ float qs[256];
    const int r = rows[blockIdx.x], h = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x;
    const long part = ((long)r * H + h) * n_splits + split;
    const int n_keys = row_keys[r];
    split_len = row_split_len(split_len, n_keys, n_splits, WARP);
    const int k_begin = split * split_len;
    const int k_end = min(n_keys, k_begin + split_len);
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    if (k_begin < k_end) {
        const __nv_bfloat16* qrow = q + ((long)r * H + h) * D;
        for (int i = lane; i < D; i += WARP) qs[i] = __bfloat162float(qrow[i]) * scale;
        __syncwarp();
        const int kvh = h / (H / KVH);
        const uint32_t* my_slots = slots + row_slot_off[r];
        for (int k0 = k_begin; k0 < k_end; k0 += WARP) {
            const int j = k0 + lane;
            float s = -INFINITY;
            long base = 0;
            if (j < k_end) {
                base = ((long)my_slots[j] * KVH + kvh) * D;
                float dot = 0.f;
                if ((D & 7) == 0 && D <= 8 * VEC_MAX) {
                    // The whole K row in 16-byte loads, all issued before any is used: one
                    // memory round trip per row instead of one per element.
                    const uint4* krow = reinterpret_cast<const uint4*>(k_pool + base);
                    uint4 buf[VEC_MAX];
#pragma unroll
                    for (int v = 0; v < VEC_MAX; v++)
                        if (v < D / 8) buf[v] = krow[v];
#pragma unroll
                    for (int v = 0; v < VEC_MAX; v++) {
                        if (v < D / 8) {
                            const __nv_bfloat162* pr = reinterpret_cast<const __nv_bfloat162*>(&buf[v]);
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                const float2 kf = __bfloat1622float2(pr[e]);
                                dot += qs[8 * v + 2 * e] * kf.x + qs[8 * v + 2 * e + 1] * kf.y;
                            }
                        }
                    }
                } else {
                    const __nv_bfloat162* krow = reinterpret_cast<const __nv_bfloat162*>(k_pool + base);
#pragma unroll 8
                    for (int i = 0; i < D / 2; i++) {
                        const float2 kf = __bfloat1622float2(krow[i]);
                        dot += qs[2 * i] * kf.x + qs[2 * i + 1] * kf.y;
                    }
                }
                s = dot;
            }
            float mx = s;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            const float m_new = fmaxf(m, mx);
            const float p = j < k_end ? __expf(s - m_new) : 0.f;
            const float corr = __expf(m - m_new);
            l = l * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++) acc[i] *= corr;
            const int n = min(WARP, k_end - k0);
            // Unrolled so that several V rows are in flight at once.
#pragma unroll 8
            for (int jj = 0; jj < n; jj++) {
                const float pj = __shfl_sync(0xffffffff, p, jj);
                const long bj = __shfl_sync(0xffffffff, base, jj);
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++)
                    if (lane + i * WARP < D)
                        acc[i] += pj * __bfloat162float(v_pool[bj + lane + i * WARP]);
            }
            m = m_new;
        }
    }
    float* o = o_part + part * D;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++)
        if (lane + i * WARP < D) o[lane + i * WARP] = acc[i];
    if (lane == 0) {
        m_part[part] = m;
        l_part[part] = l;
    }
}


// Prefill tiles: one block of 4 warps per (tile of up to 16 consecutive query rows of one
// sequence, head, split). The tile's keys are staged 32 at a time in shared memory, gathered
// through the slot list with coalesced row reads, and every K/V row loaded serves all the
// tile's queries (16 times less memory traffic than a row at a time). Each warp owns 4 query
// rows; lane j scores key j of the stage against each of them, the warp folds the scores into
// each row's online softmax, and lanes accumulate their D/32 output dims. Causal: row i of the
// tile sees keys below row_keys[row0 + i].
#define QT 16
#define KT 32
#define ROWS_PER_WARP 4
extern "C" __global__ void __launch_bounds__(128) arbor_attention_tiled(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const uint32_t* __restrict__ slots,
    const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_keys,
    const uint32_t* __restrict__ tile_row0, const uint32_t* __restrict__ tile_rows,
    float* __restrict__ o_part, float* __restrict__ m_part, float* __restrict__ l_part, int H,
    int KVH, int D, int n_splits, int split_len, float scale) {
    extern __shared__ float smem[];
    const int Dp = D + 1;  // padded rows: lane j reading row j hits distinct banks
    float* qs = smem;                      // [QT][D]
    float* ks = qs + QT * D;               // [KT][Dp]
    float* vs = ks + KT * Dp;              // [KT][Dp]
    uint32_t* sl = reinterpret_cast<uint32_t*>(vs + KT * Dp);  // [KT]
    const int tile = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    const int row0 = tile_row0[tile], nrows = tile_rows[tile];
    const int kvh = h / (H / KVH);
    const uint32_t* my_slots = slots + row_slot_off[row0];
    const int last_keys = row_keys[row0 + nrows - 1];  // the tile's widest causal window
    const int k_begin = split * split_len;
    const int k_end = min(last_keys, k_begin + split_len);
    for (int i = tid; i < QT * D; i += blockDim.x) {
        const int qr = i / D, c = i % D;
        qs[i] = qr < nrows ? __bfloat162float(q[((long)(row0 + qr) * H + h) * D + c]) * scale : 0.f;
    }
    float acc[ROWS_PER_WARP][MAX_PER_LANE];
    float m[ROWS_PER_WARP], l[ROWS_PER_WARP];
    int n_keys[ROWS_PER_WARP];
#pragma unroll
    for (int a = 0; a < ROWS_PER_WARP; a++) {
        m[a] = -INFINITY;
        l[a] = 0.f;
        const int qr = warp * ROWS_PER_WARP + a;
        n_keys[a] = qr < nrows ? (int)row_keys[row0 + qr] : 0;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) acc[a][i] = 0.f;
    }
    for (int k0 = k_begin; k0 < k_end; k0 += KT) {
        __syncthreads();  // previous stage consumed (and qs written, the first time)
        if (tid < KT) sl[tid] = k0 + tid < k_end ? my_slots[k0 + tid] : 0;
        __syncthreads();
#pragma unroll 8
        for (int i = tid; i < KT * D; i += blockDim.x) {
            const int j = i / D, c = i % D;
            const long base = ((long)sl[j] * KVH + kvh) * D + c;
            const bool live = k0 + j < k_end;
            ks[j * Dp + c] = live ? __bfloat162float(k_pool[base]) : 0.f;
            vs[j * Dp + c] = live ? __bfloat162float(v_pool[base]) : 0.f;
        }
        __syncthreads();
        const int key = k0 + lane;
#pragma unroll
        for (int a = 0; a < ROWS_PER_WARP; a++) {
            const int qr = warp * ROWS_PER_WARP + a;
            if (qr >= nrows || k0 >= n_keys[a]) continue;  // warp-uniform
            const float* qrow = qs + qr * D;
            const float* krow = ks + lane * Dp;
            float s = 0.f;
            for (int c = 0; c < D; c++) s += qrow[c] * krow[c];
            if (key >= n_keys[a]) s = -INFINITY;
            float mx = s;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            const float m_new = fmaxf(m[a], mx);
            const float p = key < n_keys[a] ? __expf(s - m_new) : 0.f;
            const float corr = __expf(m[a] - m_new);
            l[a] = l[a] * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++) acc[a][i] *= corr;
            const int n = min(KT, n_keys[a] - k0);
            for (int jj = 0; jj < n; jj++) {
                const float pj = __shfl_sync(0xffffffff, p, jj);
                const float* vrow = vs + jj * Dp;
#pragma unroll
                for (int i = 0; i < MAX_PER_LANE; i++)
                    if (lane + i * WARP < D) acc[a][i] += pj * vrow[lane + i * WARP];
            }
            m[a] = m_new;
        }
    }
#pragma unroll
    for (int a = 0; a < ROWS_PER_WARP; a++) {
        const int qr = warp * ROWS_PER_WARP + a;
        if (qr >= nrows) continue;
        const long part = ((long)(row0 + qr) * H + h) * n_splits + split;
        float* o = o_part + part * D;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++)
            if (lane + i * WARP < D) o[lane + i * WARP] = acc[a][i];
        if (lane == 0) {
            m_part[part] = m[a];
            l_part[part] = l[a];
        }
    }
}


// Decode rows, GQA-aware: one block per (query row, KV head, split) with one warp per query
// head of the group (G = H / KVH warps). The split's keys are staged 32 at a time in shared
// memory with 16-byte coalesced loads, once for the whole group (G times less K/V traffic than
// a warp per query head), then each warp scores its head (lane j: key j) and accumulates.
extern "C" __global__ void arbor_attention_gqa(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const uint32_t* __restrict__ slots,
    const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_keys,
    const uint32_t* __restrict__ rows, float* __restrict__ o_part, float* __restrict__ m_part,
    float* __restrict__ l_part, int H, int KVH, int D, int n_splits, int split_len, float scale) {
    extern __shared__ float smem[];
    const int G = H / KVH;
    const int Dp = D + 1;
    float* qs = smem;              // [G][D]
    float* ks = qs + G * D;        // [KT][Dp]
    float* vs = ks + KT * Dp;      // [KT][Dp]
    uint32_t* sl = reinterpret_cast<uint32_t*>(vs + KT * Dp);  // [KT]
    const int r = rows[blockIdx.x], kvh = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP, nthreads = blockDim.x;
    const int h = kvh * G + warp;
    const int n_keys = row_keys[r];
    split_len = row_split_len(split_len, n_keys, n_splits, KT);
    const int k_begin = split * split_len;
    const int k_end = min(n_keys, k_begin + split_len);
    const uint32_t* my_slots = slots + row_slot_off[r];
    for (int i = tid; i < G * D; i += nthreads)
        qs[i] = __bfloat162float(q[((long)r * H + kvh * G) * D + i]) * scale;
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int vec = D / 8;  // 16-byte pieces per row (D % 8 == 0 on this path)
    for (int k0 = k_begin; k0 < k_end; k0 += KT) {
        __syncthreads();
        if (tid < KT) sl[tid] = k0 + tid < k_end ? my_slots[k0 + tid] : 0;
        __syncthreads();
#pragma unroll 4
        for (int i = tid; i < KT * vec; i += nthreads) {
            const int j = i / vec, c = (i % vec) * 8;
            const long base = ((long)sl[j] * KVH + kvh) * D + c;
            const bool live = k0 + j < k_end;
            uint4 kraw = make_uint4(0, 0, 0, 0), vraw = make_uint4(0, 0, 0, 0);
            if (live) {
                kraw = *reinterpret_cast<const uint4*>(k_pool + base);
                vraw = *reinterpret_cast<const uint4*>(v_pool + base);
            }
            const __nv_bfloat162* kp = reinterpret_cast<const __nv_bfloat162*>(&kraw);
            const __nv_bfloat162* vp = reinterpret_cast<const __nv_bfloat162*>(&vraw);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float2 kf = __bfloat1622float2(kp[e]), vf = __bfloat1622float2(vp[e]);
                ks[j * Dp + c + 2 * e] = kf.x;
                ks[j * Dp + c + 2 * e + 1] = kf.y;
                vs[j * Dp + c + 2 * e] = vf.x;
                vs[j * Dp + c + 2 * e + 1] = vf.y;
            }
        }
        __syncthreads();
        const int key = k0 + lane;
        const float* qrow = qs + warp * D;
        const float* krow = ks + lane * Dp;
        float s = 0.f;
        for (int c = 0; c < D; c++) s += qrow[c] * krow[c];
        if (key >= k_end) s = -INFINITY;
        float mx = s;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
        const float m_new = fmaxf(m, mx);
        const float p = key < k_end ? __expf(s - m_new) : 0.f;
        const float corr = __expf(m - m_new);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) acc[i] *= corr;
        const int n = min(KT, k_end - k0);
        for (int jj = 0; jj < n; jj++) {
            const float pj = __shfl_sync(0xffffffff, p, jj);
            const float* vrow = vs + jj * Dp;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++)
                if (lane + i * WARP < D) acc[i] += pj * vrow[lane + i * WARP];
        }
        m = m_new;
    }
    const long part = ((long)r * H + h) * n_splits + split;
    float* o = o_part + part * D;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++)
        if (lane + i * WARP < D) o[lane + i * WARP] = acc[i];
    if (lane == 0) {
        m_part[part] = m;
        l_part[part] = l;
    }
}

// x_out = x + y; h = x_out * rsqrt(mean(x_out^2) + eps) * w. One block per row: the residual
// add and the next RMSNorm in one pass over the row instead of two kernels. Each thread owns
// up to RMS_PIECES 16-byte pieces of the row and issues all its loads (x, y and w) before
// using any, keeping the sums in registers for the second pass: at one row (batch-1 decode)
// the block is alone on the GPU, and a loop of dependent loads left it latency-bound at
// ~10 us a call, 64 calls a step. n % 8 == 0 and n <= 8 * RMS_PIECES * blockDim.x.
#define RMS_PIECES 4
__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float (&f)[8]) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const float2 t = __bfloat1622float2(p[e]);
        f[2 * e] = t.x;
        f[2 * e + 1] = t.y;
    }
}

extern "C" __global__ void arbor_add_rmsnorm(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ y,
    const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ x_out,
    __nv_bfloat16* __restrict__ h_out, int n, float eps) {
    pdl_launch_dependents();  // the next projection may start streaming its weights
    __shared__ float part[32];
    const long row = blockIdx.x;
    const int pieces = n / 8;
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * n);
    const uint4* yr = reinterpret_cast<const uint4*>(y + row * n);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    uint4 xv[RMS_PIECES], yv[RMS_PIECES], wv[RMS_PIECES];
#pragma unroll
    for (int p = 0; p < RMS_PIECES; p++) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i < pieces) {
            xv[p] = xr[i];
            yv[p] = yr[i];
            wv[p] = wr[i];
        }
    }
    float sum[RMS_PIECES][8];
    float ss = 0.f;
#pragma unroll
    for (int p = 0; p < RMS_PIECES; p++) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= pieces) continue;
        float a[8], b[8];
        bf16x8_to_float(xv[p], a);
        bf16x8_to_float(yv[p], b);
        uint4 packed;
        __nv_bfloat16* pk = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            // Rounded to bf16 first: the residual stream is bf16, like candle's add leaves it.
            pk[e] = __float2bfloat16(a[e] + b[e]);
            sum[p][e] = __bfloat162float(pk[e]);
            ss += sum[p][e] * sum[p][e];
        }
        reinterpret_cast<uint4*>(x_out + row * n)[i] = packed;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
        t = warp_sum(t);
        if (threadIdx.x == 0) part[0] = t;
    }
    __syncthreads();
    const float inv = rsqrtf(part[0] / n + eps);
#pragma unroll
    for (int p = 0; p < RMS_PIECES; p++) {
        const int i = threadIdx.x + p * blockDim.x;
        if (i >= pieces) continue;
        float g[8];
        bf16x8_to_float(wv[p], g);
        uint4 packed;
        __nv_bfloat16* pk = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
        for (int e = 0; e < 8; e++) pk[e] = __float2bfloat16(sum[p][e] * inv * g[e]);
        reinterpret_cast<uint4*>(h_out + row * n)[i] = packed;
    }
}

// One warp per (row, head): out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M). Lanes read
// 32 splits' m and l at once, so a long context's many splits cost a few memory round trips,
// not one per split.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

extern "C" __global__ void arbor_attention_merge(
    const float* __restrict__ o_part, const float* __restrict__ m_part,
    const float* __restrict__ l_part, __nv_bfloat16* __restrict__ out, int H, int D,
    int n_splits) {
    pdl_launch_dependents();  // the output projection may start streaming its weights
    // One block per (row, head); threads are (split group g, output dim d): each sums the
    // splits s = g, g + G, ... for its dim, so a long context's hundred splits cost a few
    // memory round trips instead of one per split (a warp per (row, head) left the merge
    // latency-bound at long contexts).
    extern __shared__ float w[];  // [n_splits] weights, then [blockDim.x] partial sums
    __shared__ float red[32];
    const int r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
    const long first = ((long)r * H + h) * n_splits;
    float M = -INFINITY;
    for (int s = tid; s < n_splits; s += nt)
        if (l_part[first + s] > 0.f) M = fmaxf(M, m_part[first + s]);
    M = warp_max(M);
    if ((tid & 31) == 0) red[tid / 32] = M;
    __syncthreads();
    M = -INFINITY;
    for (int i = 0; i < nt / 32; i++) M = fmaxf(M, red[i]);
    __syncthreads();
    float L = 0.f;
    for (int s = tid; s < n_splits; s += nt) {
        const float ls = l_part[first + s];
        const float ws = ls > 0.f ? __expf(m_part[first + s] - M) : 0.f;
        w[s] = ws;
        L += ls > 0.f ? ls * ws : 0.f;
    }
    L = warp_sum(L);
    if ((tid & 31) == 0) red[tid / 32] = L;
    __syncthreads();
    L = 0.f;
    for (int i = 0; i < nt / 32; i++) L += red[i];
    const int groups = max(1, nt / D);
    const int g = tid / D, d = tid % D;
    float acc = 0.f;
    if (g < groups) {
#pragma unroll 8
        for (int s = g; s < n_splits; s += groups)
            acc += w[s] * o_part[(first + s) * D + d];
    }
    float* sums = w + n_splits;
    sums[tid] = acc;
    __syncthreads();
    if (g == 0 && d < D) {
        float total = 0.f;
        for (int k = 0; k < groups; k++) total += sums[k * D + d];
        out[((long)r * H + h) * D + d] = __float2bfloat16(L > 0.f ? total / L : 0.f);
    }
}

// out[t] = table[ids[t] - first]: the embedding rows of a step's tokens, [T, n] bf16
// (n % 8 == 0), one thread per 16-byte piece. The table holds vocabulary rows [first, first +
// count): a tensor-parallel shard's slice, whose sum over ranks completes every row; ids
// outside it give zero rows. Ids are checked on the host before they are uploaded.
extern "C" __global__ void arbor_embed_rows(const __nv_bfloat16* __restrict__ table,
                                            const uint32_t* __restrict__ ids,
                                            __nv_bfloat16* __restrict__ out, int T, int n,
                                            uint32_t first, uint32_t count) {
    const int pieces = n / 8;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * pieces) return;
    const long t = idx / pieces, p = idx % pieces;
    const uint32_t row = ids[t] - first;  // wraps for ids below `first`: outside as well
    uint4 piece = make_uint4(0, 0, 0, 0);
    if (row < count) piece = reinterpret_cast<const uint4*>(table + (long)row * n)[p];
    reinterpret_cast<uint4*>(out + t * n)[p] = piece;
}

// The logits of `rows` rows gathered from every tensor-parallel rank, [ranks][rows * chunk]
// f32 where rank p wrote its [rows, w_p] vocabulary slice (w_p = min(chunk, columns - p *
// chunk)) at the start of its part, joined into out [rows, columns]: row r's slices side by
// side in rank order. One thread per output value.
extern "C" __global__ void arbor_join_columns(const float* __restrict__ parts,
                                              float* __restrict__ out, int rows, int columns,
                                              int chunk) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * columns) return;
    const long r = idx / columns;
    const int c = (int)(idx % columns);
    const int p = c / chunk, j = c - p * chunk;
    const int width = min(chunk, columns - p * chunk);
    out[idx] = parts[(long)p * rows * chunk + r * width + j];
}

// x[t, i] += bias[i] (rounded to bf16, as candle's broadcast add leaves it): [T, n].
extern "C" __global__ void arbor_add_bias(__nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ bias, int T, int n) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * n) return;
    x[idx] = __float2bfloat16(__bfloat162float(x[idx]) + __bfloat162float(bias[idx % n]));
}

// gate_up: [T, 2F] (gate then up); out: [T, F] = silu(gate) * up.
extern "C" __global__ void arbor_silu_mul(const __nv_bfloat16* __restrict__ gate_up,
                                          __nv_bfloat16* __restrict__ out, int T, int F) {
    pdl_launch_dependents();  // the down projection may start streaming its weights
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * F) return;
    const long t = idx / F, f = idx % F;
    const float g = __bfloat162float(gate_up[t * 2 * F + f]);
    const float u = __bfloat162float(gate_up[t * 2 * F + F + f]);
    out[idx] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core attention over slot lists: prefill tiles and decode rows in one kernel.
//
// mma.sync m16n8k16 (bf16 in, f32 accumulate), FlashAttention-2 style: each warp owns 16
// "rows", the scores S = Q K^T and the output O stay in registers, P is re-packed from S's
// accumulator fragments straight into the A operand of O += P V (no trip through shared
// memory), and the softmax runs online in the log2 domain.
//
// GQA: a block serves one KV head, and its rows are (query position, head of the group)
// pairs, position-major: flat row f -> position f / G, query head kvh * G + f % G. Every K/V
// row staged in shared memory serves all G heads of the group and all positions of the tile:
//
//   block (tile, kvh, split), W warps          shared memory, one 64-key stage
//   warp 0: flat rows  0..15  ┐                ks [64 keys][D + 8]   (K rows, as stored)
//   warp 1: flat rows 16..31  ├─ same keys     vs [64 keys][D + 8]   (V rows; ldmatrix.trans
//   ...                       ┘                                       makes the B fragments)
//
// Prefill tiles have 64 / G positions and 4 warps; a decode row is a tile of one position
// with ceil(G / 16) warps (the rows past G are padding: decode is bound by reading K/V, not by
// the tensor cores). Stages are copied with cp.async; the +8 padding makes every fragment
// load hit 32 distinct banks.
// Partial results (unnormalized O, running max in natural-log units, sum of exponentials) go
// to the same per-(row, head, split) buffers as the other kernels, merged by
// arbor_attention_merge. Tiles are launched heaviest first (blockIdx.x counts down), so the
// long causal tiles of a prefill do not trail at the end of the grid.
#define MMA_KT 64

// c += a b, 16x16 by 16x8: bf16 operands, or f16 (F16) for the FP8 cache's path.
template <bool F16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
    if constexpr (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Two FP8 E4M3 values (the low byte first) as two f16s, exactly: one instruction on sm_89+.
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two_bytes) {
    uint32_t r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(r) : "h"((unsigned short)two_bytes));
    return r;
}

// Two bf16s as two f16s (Q for the FP8 path: exact for |x| in f16's normal range).
__device__ __forceinline__ uint32_t bf16x2_to_f16x2(uint32_t v) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
    return pack_f16x2(f.x, f.y);
}

__device__ __forceinline__ uint32_t ld_u32(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// 16 bytes global -> shared without passing through registers; `live` false writes zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool live) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int n = live ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Four 8x8 bf16 matrices from shared memory, transposed: lanes 8i..8i+7 give the row
// addresses of matrix i; register i of lane l receives elements (2 (l % 4), l / 4) and
// (2 (l % 4) + 1, l / 4) of matrix i: an m16n8k16 B fragment from row-major rows.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// KV is the pool's element: bf16, or uint8_t for FP8 E4M3 bytes. The FP8 path stages the
// bytes as they are (half the traffic and shared memory) and converts each fragment in
// registers to f16, so its products run as f16 MMAs (Q converted from bf16, P packed as f16):
// E4M3 -> f16 is exact and one instruction, where E4M3 -> bf16 is not one. V's fragments pair
// two keys of one dimension, which ldmatrix.trans cannot gather from bytes: four byte loads
// a fragment pair instead.
template <int D, int STAGE, typename KV>
__device__ __forceinline__ void attention_mma(
    const __nv_bfloat16* __restrict__ q, const KV* __restrict__ k_pool,
    const KV* __restrict__ v_pool, const uint32_t* __restrict__ slots,
    const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_keys,
    const uint32_t* __restrict__ tile_row0, const uint32_t* __restrict__ tile_rows,
    int single_position, float* __restrict__ o_part, float* __restrict__ m_part,
    float* __restrict__ l_part, int H, int KVH, int n_splits, int split_len, float scale_log2) {
    constexpr bool FP8 = sizeof(KV) == 1;
    constexpr int ROW_BYTES = D * (int)sizeof(KV);  // one head's K (or V) row in the pool
    // Staged rows are padded by 16 bytes: every fragment load hits distinct banks, and rows
    // stay 16-byte aligned for cp.async.
    constexpr int KSB = ROW_BYTES + 16;  // row stride in bytes
    constexpr int KS = KSB / 2;         // ... in bf16 elements (the bf16 path)
    constexpr int KC = D / 16;      // 16-dim chunks of a head (k steps of S = Q K^T)
    constexpr int NT = STAGE / 8;  // 8-key tiles of a stage (n tiles of S)
    constexpr int DT = D / 8;       // 8-dim tiles of O
    __shared__ __align__(16) uint8_t ks_bytes[STAGE * KSB];
    __shared__ __align__(16) uint8_t vs_bytes[STAGE * KSB];
    __shared__ uint32_t sl[STAGE];
    const __nv_bfloat16* ks = reinterpret_cast<const __nv_bfloat16*>(ks_bytes);
    const __nv_bfloat16* vs = reinterpret_cast<const __nv_bfloat16*>(vs_bytes);

    const int G = H / KVH;
    const int tile = gridDim.x - 1 - blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;  // fragment row group, thread in group
    const int row0 = tile_row0[tile];
    const int npos = single_position ? 1 : (int)tile_rows[tile];
    const int nflat = npos * G;
    const uint32_t* my_slots = slots + row_slot_off[row0];
    const int last_keys = row_keys[row0 + npos - 1];  // the widest causal window of the tile
    split_len = row_split_len(split_len, last_keys, n_splits, STAGE);
    const int k_begin = split * split_len;
    const int k_end = min(last_keys, k_begin + split_len);

    // This lane's two fragment rows (gid and gid + 8 of the warp's 16).
    int n_keys[2];
    bool valid[2];
    const __nv_bfloat16* qrow[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int f = warp * 16 + gid + 8 * i;
        valid[i] = f < nflat;
        const int p = valid[i] ? f / G : 0, g = valid[i] ? f % G : 0;
        n_keys[i] = valid[i] ? (int)row_keys[row0 + p] : 0;
        qrow[i] = q + ((long)(row0 + p) * H + kvh * G + g) * D;
    }
    // Q as A fragments, kept in registers for the whole key loop.
    uint32_t qa[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        const int c = kc * 16 + 2 * tig;
        qa[kc][0] = valid[0] ? ld_u32(qrow[0] + c) : 0u;
        qa[kc][1] = valid[1] ? ld_u32(qrow[1] + c) : 0u;
        qa[kc][2] = valid[0] ? ld_u32(qrow[0] + c + 8) : 0u;
        qa[kc][3] = valid[1] ? ld_u32(qrow[1] + c + 8) : 0u;
        if constexpr (FP8) {
#pragma unroll
            for (int e = 0; e < 4; e++) qa[kc][e] = bf16x2_to_f16x2(qa[kc][e]);
        }
    }
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int k0 = k_begin; k0 < k_end; k0 += STAGE) {
        __syncthreads();  // the previous stage is consumed
        for (int i = tid; i < STAGE; i += blockDim.x)
            sl[i] = k0 + i < k_end ? my_slots[k0 + i] : 0xffffffffu;
        __syncthreads();
        // The stage's K and V rows straight from the pool into shared memory (cp.async: every
        // copy of the stage in flight at once, no registers held, one memory round trip per
        // stage even for a one-warp decode block). Keys past the split are zeros.
        constexpr int ROW_PIECES = ROW_BYTES / 16;
        constexpr int PIECES = STAGE * ROW_PIECES;
        const uint8_t* k_bytes = reinterpret_cast<const uint8_t*>(k_pool);
        const uint8_t* v_bytes = reinterpret_cast<const uint8_t*>(v_pool);
        for (int i = tid; i < PIECES; i += blockDim.x) {
            const int j = i / ROW_PIECES, c = (i % ROW_PIECES) * 16;
            const bool live = sl[j] != 0xffffffffu;
            const long base = live ? ((long)sl[j] * KVH + kvh) * ROW_BYTES + c : 0;
            cp_async16(&ks_bytes[j * KSB + c], k_bytes + base, live);
            cp_async16(&vs_bytes[j * KSB + c], v_bytes + base, live);
        }
        cp_async_wait_all();
        __syncthreads();
        if (warp * 16 >= nflat) continue;  // a padding warp (warp-uniform); still syncs above

        // S = Q K^T: 16 rows x STAGE keys, STAGE / 8 n-tiles of 4 accumulators per lane.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            if constexpr (FP8) {
                const uint8_t* kr = ks_bytes + (nt * 8 + gid) * KSB + 2 * tig;
#pragma unroll
                for (int kc = 0; kc < KC; kc++) {
                    const uint32_t b0 = *reinterpret_cast<const uint16_t*>(kr + kc * 16);
                    const uint32_t b1 = *reinterpret_cast<const uint16_t*>(kr + kc * 16 + 8);
                    mma_16816<true>(s[nt], qa[kc], e4m3x2_to_f16x2(b0), e4m3x2_to_f16x2(b1));
                }
            } else {
                const __nv_bfloat16* kr = ks + (nt * 8 + gid) * KS + 2 * tig;
#pragma unroll
                for (int kc = 0; kc < KC; kc++)
                    mma_16816<false>(s[nt], qa[kc], ld_u32(kr + kc * 16), ld_u32(kr + kc * 16 + 8));
            }
        }
        // Causal mask and scale; accumulator e of tile nt is (row gid + 8 (e / 2), key
        // nt * 8 + 2 tig + e % 2).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + nt * 8 + 2 * tig + (e & 1), ri = e >> 1;
                const float v = key < n_keys[ri] && key < k_end ? s[nt][e] * scale_log2 : -INFINITY;
                s[nt][e] = v;
                mx[ri] = fmaxf(mx[ri], v);
            }
        }
        float corr[2], m_use[2];
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            // The 4 lanes of a row group hold its STAGE scores between them.
            mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffff, mx[ri], 1));
            mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffff, mx[ri], 2));
            const float m_new = fmaxf(m[ri], mx[ri]);
            // A row with no keys yet keeps m = -inf; exponentials against 0 give it zeros.
            m_use[ri] = m_new == -INFINITY ? 0.f : m_new;
            corr[ri] = exp2f(m[ri] - m_use[ri]);
            m[ri] = m_new;
            l[ri] *= corr[ri];  // per-lane partial sums, reduced over the group at the end
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int ri = e >> 1;
                s[nt][e] = exp2f(s[nt][e] - m_use[ri]);
                l[ri] += s[nt][e];
            }
        }
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            o[dt][0] *= corr[0];
            o[dt][1] *= corr[0];
            o[dt][2] *= corr[1];
            o[dt][3] *= corr[1];
        }
        // O += P V, 16 keys at a time: P's A fragment is two S tiles' accumulators.
#pragma unroll
        for (int kk = 0; kk < STAGE / 16; kk++) {
            const auto pack = FP8 ? pack_f16x2 : pack_bf16x2;
            const uint32_t pa[4] = {
                pack(s[2 * kk][0], s[2 * kk][1]),
                pack(s[2 * kk][2], s[2 * kk][3]),
                pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            if constexpr (FP8) {
                // Lane (gid, tig) needs keys 2 tig, 2 tig + 1 (b0) and 2 tig + 8, + 9 (b1) of
                // dimension dt * 8 + gid.
                const uint8_t* vcol = vs_bytes + (kk * 16 + 2 * tig) * KSB + gid;
#pragma unroll
                for (int dt = 0; dt < DT; dt++) {
                    const uint8_t* p = vcol + dt * 8;
                    const uint32_t b0 = (uint32_t)p[0] | (uint32_t)p[KSB] << 8;
                    const uint32_t b1 = (uint32_t)p[8 * KSB] | (uint32_t)p[9 * KSB] << 8;
                    mma_16816<true>(o[dt], pa, e4m3x2_to_f16x2(b0), e4m3x2_to_f16x2(b1));
                }
            } else {
                // V's B fragments for two 8-dim tiles at once: lanes 0-15 address keys
                // kk * 16 + 0..15 of tile dt, lanes 16-31 the same keys of tile dt + 1.
                const __nv_bfloat16* vrow = vs + (kk * 16 + (lane & 15)) * KS + (lane >> 4) * 8;
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    uint32_t vb[4];
                    ldmatrix_x4_trans(vb, vrow + dt * 8);
                    mma_16816<false>(o[dt], pa, vb[0], vb[1]);
                    mma_16816<false>(o[dt + 1], pa, vb[2], vb[3]);
                }
            }
        }
    }
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        l[ri] += __shfl_xor_sync(0xffffffff, l[ri], 1);
        l[ri] += __shfl_xor_sync(0xffffffff, l[ri], 2);
    }
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        if (!valid[ri]) continue;
        const int f = warp * 16 + gid + 8 * ri;
        const int r = row0 + f / G, h = kvh * G + f % G;
        const long part = ((long)r * H + h) * n_splits + split;
        float* op = o_part + part * D + 2 * tig;
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            *reinterpret_cast<float2*>(op + dt * 8) = make_float2(o[dt][2 * ri], o[dt][2 * ri + 1]);
        if (tig == 0) {
            // Natural-log units, as the merge (and the other kernels) use.
            m_part[part] = m[ri] == -INFINITY ? -INFINITY : m[ri] * 0.69314718f;
            l_part[part] = l[ri];
        }
    }
}

// NAME's stages hold STAGE keys: 64 for prefill tiles (4 warps share each stage); decode blocks
// (usually one warp) take shorter stages, so that more blocks fit an SM's shared memory and
// their loads overlap each other's arithmetic (a one-warp block waits for its own stage).
// KV: the pool's element (the `_fp8` kernels read FP8 E4M3 pools).
#define ATTENTION_MMA(NAME, D, STAGE, KV)                                                          \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                        \
        const __nv_bfloat16* __restrict__ q, const KV* __restrict__ k_pool,                        \
        const KV* __restrict__ v_pool, const uint32_t* __restrict__ slots,                         \
        const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_keys,          \
        const uint32_t* __restrict__ tile_row0, const uint32_t* __restrict__ tile_rows,            \
        int single_position, float* __restrict__ o_part, float* __restrict__ m_part,               \
        float* __restrict__ l_part, int H, int KVH, int n_splits, int split_len,                   \
        float scale_log2) {                                                                        \
        attention_mma<D, STAGE, KV>(q, k_pool, v_pool, slots, row_slot_off, row_keys, tile_row0,   \
                                    tile_rows, single_position, o_part, m_part, l_part, H, KVH,    \
                                    n_splits, split_len, scale_log2);                              \
    }
#define ATTENTION_MMA_ALL(SUFFIX, KV)                                                              \
    ATTENTION_MMA(arbor_attention_mma_d64##SUFFIX, 64, MMA_KT, KV)                                 \
    ATTENTION_MMA(arbor_attention_mma_d128##SUFFIX, 128, MMA_KT, KV)                               \
    ATTENTION_MMA(arbor_attention_mma_decode_d64_k16##SUFFIX, 64, 16, KV)                          \
    ATTENTION_MMA(arbor_attention_mma_decode_d128_k16##SUFFIX, 128, 16, KV)                        \
    ATTENTION_MMA(arbor_attention_mma_decode_d64_k32##SUFFIX, 64, 32, KV)                          \
    ATTENTION_MMA(arbor_attention_mma_decode_d128_k32##SUFFIX, 128, 32, KV)
ATTENTION_MMA_ALL(, __nv_bfloat16)
ATTENTION_MMA_ALL(_fp8, uint8_t)

// ---------------------------------------------------------------------------------------------
// y [M, N] = x [M, K] W^T for a few rows, W [N, K] bf16 row-major: an experiment kept behind
// --cuda-gemv (docs/BENCHMARKS.md). Pure weight streaming: one warp per output row n reads W's
// row once in 16-byte loads (four in flight per lane, L1 bypassed) and dots it with the M
// activation rows (served from L1/L2). On the H200 it matched cuBLAS at one row (0.125 against
// 0.124 ms per 8B layer) and lost at 2-4 rows (the M activation reads per weight piece), so
// cuBLAS stays the default. K % 8 == 0.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
    const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const float2 fa = __bfloat1622float2(pa[e]), fb = __bfloat1622float2(pb[e]);
        s += fa.x * fb.x + fa.y * fb.y;
    }
    return s;
}

#define GEMV_WARPS 4
#define GEMV_UNROLL 4
// A 16-byte load through the coherent path (not ld.global.nc, which the compiler may pick
// for const __restrict__ pointers and which assumes the data never changes while the kernel
// runs).
__device__ __forceinline__ uint4 ld_plain(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// PDL: launched as a programmatic dependent, each warp issues its first weight loads (which
// do not depend on the kernel before) and only then waits for that kernel, whose output x it
// reads with plain loads (it was written while this kernel was already running).
template <int M, bool PDL>
__device__ __forceinline__ void gemv_bf16(const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ w,
                                          __nv_bfloat16* __restrict__ y, int N, int K) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const long n = (long)blockIdx.x * GEMV_WARPS + warp;
    if (n >= N) {
        if (PDL) pdl_wait();
        return;
    }
    const uint4* wr = reinterpret_cast<const uint4*>(w + n * K);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    const int chunks = K / 8, xstride = K / 8;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.f;
    bool waited = !PDL;
    int c = lane;
    for (; c + (GEMV_UNROLL - 1) * WARP < chunks; c += GEMV_UNROLL * WARP) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) wv[u] = ld_stream(wr + c + u * WARP);
        if (!waited) {
            pdl_wait();
            waited = true;
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
            for (int m = 0; m < M; m++) {
                const uint4 xv = PDL ? ld_plain(xr + m * xstride + c + u * WARP) : __ldg(xr + m * xstride + c + u * WARP);
                acc[m] += dot8(wv[u], xv);
            }
    }
    if (!waited) pdl_wait();
    for (; c < chunks; c += WARP) {
        const uint4 wv = ld_stream(wr + c);
#pragma unroll
        for (int m = 0; m < M; m++) {
            const uint4 xv = PDL ? ld_plain(xr + m * xstride + c) : __ldg(xr + m * xstride + c);
            acc[m] += dot8(wv, xv);
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        const float v = warp_sum(acc[m]);
        if (lane == 0) y[(long)m * N + n] = __float2bfloat16(v);
    }
}

#define GEMV(NAME, M, PDL)                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP) NAME(                      \
        const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,              \
        __nv_bfloat16* __restrict__ y, int N, int K) {                                         \
        gemv_bf16<M, PDL>(x, w, y, N, K);                                                      \
    }
GEMV(arbor_gemv_m1, 1, false)
GEMV(arbor_gemv_pdl_m1, 1, true)
