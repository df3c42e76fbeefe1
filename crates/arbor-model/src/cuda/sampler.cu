// Arbor's GPU sampler: one thread block per sampling row turns that row's logits into the next
// token where they are, with the semantics of crates/arbor-model/src/sampling.rs (the CPU
// sampler, the one definition):
//
//   raw logits --(logprobs: log-softmax, top alternatives)--> reported log-probabilities
//   raw logits --bias, repetition, presence/frequency, bans--> adjusted (`work`)
//   greedy: argmax, first maximum (bit-identical to the CPU's adjusted logits and argmax)
//   else:   p = exp((l - max) / T); keep the first L tokens in (logit desc, id asc) order with
//           L = min(top-k, top-p's smallest nucleus, min-p's count); draw by exponential races
//           (argmax p_i / E_i, E_i ~ Exp(1) from Philox keyed by the sequence's seed and its
//           draw count), which picks token i with probability p_i / sum of kept p.
//
// No sorting: a prefix of that order is named by one 64-bit key (ordered logit bits, then the
// inverted id), the L-th largest key is found by an 8-bit radix select (integer counts), and
// top-p's cut by a radix select over the logit bits with fixed-point integer mass sums, so the
// same seed gives the same tokens run after run.
//
// Everything comes in one packed buffer (RowParams for each row, then the adjustment entries)
// copied up in one transfer; each row writes one RowOut.

#include <stdint.h>

#define THREADS 1024
#define WARPS (THREADS / 32)
#define MAX_TOP 20

struct RowParams {  // 16 words, mirrored by cuda/sampler.rs
    float temperature;  // 0: greedy
    float top_p;        // 1: off
    float min_p;        // 0: off
    float rep_penalty;  // used where an entry's flag says so
    uint32_t top_k;     // 0: off
    uint32_t adj_start; // entries of this row in the adjustment list
    uint32_t adj_len;
    int32_t top_n;      // -1: no log-probabilities; else alternatives to report (<= MAX_TOP)
    uint32_t seed_lo, seed_hi;
    uint32_t draw_lo, draw_hi;  // the sequence's draw count: Philox counter
    uint32_t logit_row;         // row of the logits matrix
    uint32_t mask_start;        // the allowed-token bits, in words into the adjustment
                                // region; 0xFFFFFFFF: no mask (structured output)
    uint32_t pad[2];
};

struct Adjust {  // 4 words: one distinct token of one row
    uint32_t token;
    float bias;     // added first (logit_bias)
    float sub;      // subtracted after the repetition penalty (presence + frequency * count)
    uint32_t flags; // 1: repetition penalty applies; 2: banned (-inf)
};

struct RowOut {  // 2 + 2 * MAX_TOP words
    uint32_t token;
    float logprob;
    uint32_t top_ids[MAX_TOP];
    float top_logprobs[MAX_TOP];
};

static_assert(sizeof(RowParams) == 64, "RowParams layout");
static_assert(sizeof(Adjust) == 16, "Adjust layout");
static_assert(sizeof(RowOut) == 8 + 8 * MAX_TOP, "RowOut layout");

// Ordered bits of a float: larger floats give larger keys. NaN counts as -inf (never picked
// before a number, like the CPU's argmax) and -0 as +0 (equal there too).
__device__ __forceinline__ uint32_t ordered(float f) {
    if (f != f) f = -INFINITY;
    if (f == 0.0f) f = 0.0f;
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float unordered(uint32_t o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// The order of candidates: logit descending, then id ascending. Keys are distinct.
__device__ __forceinline__ uint64_t rank_key(float f, uint32_t id) {
    return ((uint64_t)ordered(f) << 32) | (uint64_t)(0xffffffffu - id);
}

__device__ __forceinline__ uint32_t key_id(uint64_t k) {
    return 0xffffffffu - (uint32_t)(k & 0xffffffffu);
}

// Block reductions in a fixed order (per-thread partials, then a fixed shuffle tree): the same
// inputs give the same bits every run.
__device__ double block_sum_f64(double v, double* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < WARPS ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ uint32_t block_sum_u32(uint32_t v, uint32_t* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < WARPS ? scratch[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ uint64_t block_max_u64(uint64_t v, uint64_t* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t other = __shfl_xor_sync(0xffffffff, v, o);
        v = other > v ? other : v;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < WARPS ? scratch[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t other = __shfl_xor_sync(0xffffffff, v, o);
        v = other > v ? other : v;
    }
    return v;
}

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), first word.
__device__ __forceinline__ uint32_t philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                           uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c0;
}

// The L-th largest rank key of the row (1-based; L <= n), by 8-bit radix select over the
// 64-bit keys: every key >= the result is among the first L. Exits early once the bucket
// holding the L-th key is taken whole (the result then has its low bits zero).
__device__ uint64_t select_rank(const float* __restrict__ v, int n, uint32_t L,
                                uint32_t* hist, uint64_t* shared_prefix, uint32_t* shared_need,
                                int* shared_done) {
    uint64_t prefix = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        const uint64_t high_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
        for (int b = threadIdx.x; b < 256; b += THREADS) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += THREADS) {
            const uint64_t k = rank_key(v[i], (uint32_t)i);
            if ((k & high_mask) == prefix) atomicAdd(&hist[(k >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t need = shift == 56 ? L : *shared_need, before = 0;
            int chosen = 0;
            for (int b = 255; b >= 0; --b) {
                if (before + hist[b] >= need) {
                    chosen = b;
                    break;
                }
                before += hist[b];
            }
            need -= before;
            *shared_prefix = prefix | ((uint64_t)chosen << shift);
            *shared_need = need;
            *shared_done = hist[chosen] == need;
        }
        __syncthreads();
        prefix = *shared_prefix;
        const int done = *shared_done;
        __syncthreads();
        if (done) break;
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(THREADS) arbor_sample(
    const uint32_t* __restrict__ packed,  // RowParams x rows, then Adjust entries
    int adjust_offset_words,
    const float* __restrict__ logits,     // [logit rows, vocab]
    int vocab,
    float* __restrict__ work,             // [rows, vocab]: adjusted logits
    float* __restrict__ probs,            // [rows, vocab]: unnormalized kept probabilities
    RowOut* __restrict__ out) {
    __shared__ double dscratch[WARPS];
    __shared__ uint32_t uscratch[WARPS];
    __shared__ uint64_t kscratch[WARPS];
    __shared__ uint32_t hist[256];
    __shared__ uint64_t sel_prefix;
    __shared__ uint32_t sel_need;
    __shared__ int sel_done;
    __shared__ unsigned long long mass_hist[256];
    __shared__ double tp_need;
    __shared__ unsigned long long tp_mass_gt;
    __shared__ uint32_t tp_count_gt, tp_count_eq, tp_prefix;

    const int row = blockIdx.x;
    const RowParams p = reinterpret_cast<const RowParams*>(packed)[row];
    const Adjust* adj = reinterpret_cast<const Adjust*>(packed + adjust_offset_words) + p.adj_start;
    const float* raw = logits + (size_t)p.logit_row * vocab;
    float* w = work + (size_t)row * vocab;
    float* pr = probs + (size_t)row * vocab;
    const int n = vocab;

    // 1. Log-probabilities of the raw distribution (what vLLM and OpenAI report).
    double log_z = 0.0;
    if (p.top_n >= 0) {
        uint64_t best = 0;
        for (int i = threadIdx.x; i < n; i += THREADS) {
            const uint64_t k = rank_key(raw[i], (uint32_t)i);
            best = k > best ? k : best;
        }
        best = block_max_u64(best, kscratch);
        const float mx = raw[key_id(best)];
        double s = 0.0;
        for (int i = threadIdx.x; i < n; i += THREADS) s += (double)expf(raw[i] - mx);
        s = block_sum_f64(s, dscratch);
        log_z = (double)mx + log(s);
        // The top alternatives: the largest keys, one pass each (top_n <= MAX_TOP).
        uint64_t bound = ~0ull;
        for (int j = 0; j < p.top_n && j < n; ++j) {
            uint64_t b = 0;
            for (int i = threadIdx.x; i < n; i += THREADS) {
                const uint64_t k = rank_key(raw[i], (uint32_t)i);
                if (k < bound && k > b) b = k;
            }
            b = block_max_u64(b, kscratch);
            if (threadIdx.x == 0) {
                const uint32_t id = key_id(b);
                out[row].top_ids[j] = id;
                out[row].top_logprobs[j] = (float)((double)raw[id] - log_z);
            }
            bound = b;
        }
    }

    // 2. Adjusted logits: a copy of the row (tokens a mask leaves out at -inf), then each
    // adjusted token once, in the CPU's order (bias, repetition, presence/frequency, ban;
    // a masked token stays -inf through all of them). IEEE division: the fast-math build
    // would round differently from the CPU and could flip a greedy near-tie.
    const uint32_t* mask =
        p.mask_start == 0xFFFFFFFFu ? nullptr : packed + adjust_offset_words + p.mask_start;
    for (int i = threadIdx.x; i < n; i += THREADS)
        w[i] = (mask == nullptr || ((mask[i >> 5] >> (i & 31)) & 1u)) ? raw[i] : -INFINITY;
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < p.adj_len; e += THREADS) {
        const Adjust a = adj[e];
        if (a.token >= (uint32_t)n) continue;
        float l = __fadd_rn(w[a.token], a.bias);
        if (a.flags & 1u) l = l > 0.0f ? __fdiv_rn(l, p.rep_penalty) : __fmul_rn(l, p.rep_penalty);
        l = __fsub_rn(l, a.sub);
        if (a.flags & 2u) l = -INFINITY;
        w[a.token] = l;
    }
    __syncthreads();

    // 3. The maximum (and the greedy token: the first maximum).
    uint64_t top = 0;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const uint64_t k = rank_key(w[i], (uint32_t)i);
        top = k > top ? k : top;
    }
    top = block_max_u64(top, kscratch);
    uint32_t token = key_id(top);

    if (!(p.temperature == 0.0f || p.top_k == 1)) {
        const float mx = w[token];
        const float t = p.temperature;
        // 4. top-k: the first k in rank order.
        uint32_t L = (uint32_t)n;
        uint64_t k_cut = 0;  // keys >= k_cut are in the top-k set
        if (p.top_k > 0 && p.top_k < (uint32_t)n) {
            k_cut = select_rank(w, n, p.top_k, hist, &sel_prefix, &sel_need, &sel_done);
            L = p.top_k;
        }
        // 5. Unnormalized probabilities of the top-k set (the maximum's is 1).
        for (int i = threadIdx.x; i < n; i += THREADS) {
            const float l = w[i];
            const bool in_k = rank_key(l, (uint32_t)i) >= k_cut;
            pr[i] = in_k ? expf(__fdiv_rn(l - mx, t)) : 0.0f;
        }
        __syncthreads();
        // 6. top-p: the smallest prefix whose mass reaches top_p of the total. An 8-bit radix
        // select over the ordered logit bits, with each bin's mass summed in 2^-40 fixed point
        // (integer atomics: the same bits every run), finds in four passes the logit key c
        // with mass(key > c) < need <= mass(key >= c); ties at c all have one probability, so
        // how many of them (in id order) it takes is arithmetic.
        if (p.top_p < 1.0f) {
            const double fix = 1099511627776.0;  // 2^40
            uint32_t prefix = 0;
            for (int shift = 24; shift >= 0; shift -= 8) {
                const uint32_t high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
                for (int b = threadIdx.x; b < 256; b += THREADS) {
                    hist[b] = 0;
                    mass_hist[b] = 0ull;
                }
                __syncthreads();
                for (int i = threadIdx.x; i < n; i += THREADS) {
                    if (rank_key(w[i], (uint32_t)i) < k_cut) continue;
                    const uint32_t o = ordered(w[i]);
                    if ((o & high_mask) != prefix) continue;
                    const uint32_t b = (o >> shift) & 255u;
                    const unsigned long long q = (unsigned long long)llrint((double)pr[i] * fix);
                    // Most logits share a few bins (their exponents): lanes of a warp with the
                    // same bin add up first, and one of them does the shared-memory atomics.
                    const unsigned same = __match_any_sync(__activemask(), b);
                    unsigned long long sum = 0;
                    for (unsigned m = same; m; m &= m - 1) sum += __shfl_sync(same, q, __ffs(m) - 1);
                    if ((int)(threadIdx.x & 31) == __ffs(same) - 1) {
                        atomicAdd(&hist[b], (uint32_t)__popc(same));
                        atomicAdd(&mass_hist[b], sum);
                    }
                }
                __syncthreads();
                if (threadIdx.x == 0) {
                    if (shift == 24) {
                        unsigned long long total = 0;
                        for (int b = 0; b < 256; ++b) total += mass_hist[b];
                        tp_need = (double)p.top_p * (double)total;
                        tp_mass_gt = 0ull;
                        tp_count_gt = 0u;
                    }
                    unsigned long long cum = tp_mass_gt;
                    uint32_t count = tp_count_gt;
                    int chosen = 0;
                    for (int b = 255; b >= 0; --b) {
                        if ((double)(cum + mass_hist[b]) >= tp_need) {
                            chosen = b;
                            break;
                        }
                        cum += mass_hist[b];
                        count += hist[b];
                    }
                    tp_mass_gt = cum;
                    tp_count_gt = count;
                    tp_count_eq = hist[chosen];
                    tp_prefix = prefix | ((uint32_t)chosen << shift);
                }
                __syncthreads();
                prefix = tp_prefix;
                __syncthreads();
            }
            // Every tie has the weight of the logit behind key `prefix`, computed as in 5.
            const double tie_q =
                (double)llrint((double)expf(__fdiv_rn(unordered(prefix) - mx, t)) * fix);
            uint32_t ties = tp_count_eq;
            if (tie_q > 0.0) {
                const double m = ceil((tp_need - (double)tp_mass_gt) / tie_q);
                ties = m < 1.0 ? 1u : (m >= (double)tp_count_eq ? tp_count_eq : (uint32_t)m);
            }
            const uint32_t lp = tp_count_gt + (ties > 0 ? ties : 1u);
            L = lp < L ? lp : L;
        }
        // 7. min-p: p >= min_p * p_max, i.e. weight >= min_p (the maximum's weight is 1).
        if (p.min_p > 0.0f) {
            uint32_t c = 0;
            for (int i = threadIdx.x; i < n; i += THREADS)
                if (pr[i] > 0.0f && pr[i] >= p.min_p) c += 1;
            c = block_sum_u32(c, uscratch);
            c = c < 1u ? 1u : c;
            L = c < L ? c : L;
        }
        // 8. The kept prefix, and the draw among it.
        const uint64_t cut =
            L < (uint32_t)n ? select_rank(w, n, L, hist, &sel_prefix, &sel_need, &sel_done) : 0ull;
        uint64_t best = 0;  // (ordered score << 32) | inverted id
        for (int i = threadIdx.x; i < n; i += THREADS) {
            const float q = pr[i];
            if (q <= 0.0f || rank_key(w[i], (uint32_t)i) < cut) continue;
            const uint32_t r = philox((uint32_t)i, p.draw_lo, p.draw_hi, 0x5eedu, p.seed_lo, p.seed_hi);
            const float u = ((float)(r >> 8) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
            const float score = q / -logf(u);
            const uint64_t k = rank_key(score, (uint32_t)i);
            best = k > best ? k : best;
        }
        best = block_max_u64(best, kscratch);
        token = best ? key_id(best) : token;
    }

    if (threadIdx.x == 0) {
        out[row].token = token;
        out[row].logprob = p.top_n >= 0 ? (float)((double)raw[token] - log_z) : 0.0f;
    }
}
