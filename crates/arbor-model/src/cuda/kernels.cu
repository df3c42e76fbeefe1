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
#include <stdint.h>

#define WARP 32
#define MAX_PER_LANE 8  // D <= 256

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// One thread per (token, rotated pair or copied element).
// qkv: [T, (H + 2*KVH) * D]; cos/sin: [max_pos, D/2] f32; positions, slots: [T].
// interleaved: pairs (2i, 2i+1) (GGUF Llama); else halves (i, i + D/2) (Hugging Face).
extern "C" __global__ void arbor_qkv_rope_write(
    const __nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ positions,
    const uint32_t* __restrict__ slots, const float* __restrict__ cos_t,
    const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ q_out,
    __nv_bfloat16* __restrict__ k_pool, __nv_bfloat16* __restrict__ v_pool, int T, int H,
    int KVH, int D, int interleaved) {
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
    __nv_bfloat16* dst;
    if (head < H) {
        dst = q_out + (long)t * H * D + (long)head * D;
    } else if (head < H + KVH) {
        dst = k_pool + (long)slots[t] * KVH * D + (long)(head - H) * D;
    } else {
        dst = v_pool + (long)slots[t] * KVH * D + (long)(head - H - KVH) * D;
    }
    dst[a] = __float2bfloat16(x0);
    dst[b] = __float2bfloat16(x1);
}

// One warp per (query row, head, split). Row r attends keys [0, row_keys[r]) of the slot list
// starting at row_slot_off[r]; this split takes keys [split * split_len, ...). Writes the
// unnormalized output, the running max and the sum of exponentials of its keys.
extern "C" __global__ void arbor_attention(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_pool,
    const __nv_bfloat16* __restrict__ v_pool, const uint32_t* __restrict__ slots,
    const uint32_t* __restrict__ row_slot_off, const uint32_t* __restrict__ row_keys,
    float* __restrict__ o_part, float* __restrict__ m_part, float* __restrict__ l_part, int H,
    int KVH, int D, int n_splits, int split_len, float scale) {
    const int r = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x;
    const long part = ((long)r * H + h) * n_splits + split;
    const int n_keys = row_keys[r];
    const int k_begin = split * split_len;
    const int k_end = min(n_keys, k_begin + split_len);
    float acc[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    if (k_begin < k_end) {
        float qv[MAX_PER_LANE];
        const __nv_bfloat16* qrow = q + ((long)r * H + h) * D;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++)
            qv[i] = lane + i * WARP < D ? __bfloat162float(qrow[lane + i * WARP]) * scale : 0.f;
        const int kvh = h / (H / KVH);
        const uint32_t* my_slots = slots + row_slot_off[r];
        for (int j = k_begin; j < k_end; j++) {
            const long base = ((long)my_slots[j] * KVH + kvh) * D;
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++)
                if (lane + i * WARP < D) dot += qv[i] * __bfloat162float(k_pool[base + lane + i * WARP]);
            const float s = warp_sum(dot);
            const float m_new = fmaxf(m, s);
            const float corr = __expf(m - m_new);
            const float p = __expf(s - m_new);
            l = l * corr + p;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++)
                if (lane + i * WARP < D)
                    acc[i] = acc[i] * corr + p * __bfloat162float(v_pool[base + lane + i * WARP]);
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

// One warp per (row, head): out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M).
extern "C" __global__ void arbor_attention_merge(
    const float* __restrict__ o_part, const float* __restrict__ m_part,
    const float* __restrict__ l_part, __nv_bfloat16* __restrict__ out, int H, int D,
    int n_splits) {
    const int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    const long first = ((long)r * H + h) * n_splits;
    float M = -INFINITY;
    for (int s = 0; s < n_splits; s++) M = fmaxf(M, m_part[first + s]);
    float L = 0.f;
    for (int s = 0; s < n_splits; s++)
        if (l_part[first + s] > 0.f) L += l_part[first + s] * __expf(m_part[first + s] - M);
    for (int d = lane; d < D; d += WARP) {
        float acc = 0.f;
        for (int s = 0; s < n_splits; s++)
            if (l_part[first + s] > 0.f)
                acc += o_part[(first + s) * D + d] * __expf(m_part[first + s] - M);
        out[((long)r * H + h) * D + d] = __float2bfloat16(L > 0.f ? acc / L : 0.f);
    }
}

// gate_up: [T, 2F] (gate then up); out: [T, F] = silu(gate) * up.
extern "C" __global__ void arbor_silu_mul(const __nv_bfloat16* __restrict__ gate_up,
                                          __nv_bfloat16* __restrict__ out, int T, int F) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * F) return;
    const long t = idx / F, f = idx % F;
    const float g = __bfloat162float(gate_up[t * 2 * F + f]);
    const float u = __bfloat162float(gate_up[t * 2 * F + F + f]);
    out[idx] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
}
