// Kernels of the candle backend on CUDA, compiled at start-up with NVRTC for the loaded model's
// shape: the host prepends `#define DIM <head dim>`, `#define GROUP <query heads per KV head>` and
// `#define WARPS <the most warps a paged-attention block may have>`.
// No headers: 16-bit floats are converted with bit operations and PTX.
//
// rope_and_cache_<type>: rotates each token's query and key heads in place (half-split or
// interleaved pairs) and writes its keys and values into the paged cache at the token's slot
// (none for a padding row's).
// paged_attention_<type>: every token's attention over its own sequence's cached positions
// 0..=position, read through the sequence's block table — prefill chunks and decode tokens alike.
// One block per (token, KV head), of up to WARPS warps (blockDim.x / 32: the host gives a small
// grid — a decode step of a few sequences — many, a grid that fills the device 4): the GROUP
// query heads that share the KV head read each cached key and value once; each warp takes every
// warps-th position with an online softmax in f32, and the warps' partial results are merged at
// the end. A small grid may also split each token's positions over several blocks
// (PARALLAX_ATTENTION_SPLITS), whose partial results paged_attention_merge_<type> combines.
// silu_and_mul_<type>: SwiGLU's SiLU(gate) x up, fused.
// sample_rows_f32 (at the end): a token per row of logits, sampled on the device.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PER_LANE (DIM / 32)
// The slot of a padding row (a CUDA graph's batch past the step's rows): nothing is cached.
#define PADDING_SLOT 0xffffffffu

__device__ __forceinline__ float neg_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

struct Bf16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(T x) { return bf16_to_f32(x); }
    static __device__ __forceinline__ T store(float f) { return f32_to_bf16(f); }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(T x) { return f16_to_f32(x); }
    static __device__ __forceinline__ T store(float f) { return f32_to_f16(f); }
};
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(T x) { return x; }
    static __device__ __forceinline__ T store(float f) { return f; }
};

// grid (tokens, heads + kv_heads), block (DIM / 2): one thread per rotated pair.
template <typename D>
__device__ void rope_and_cache(
    typename D::T* __restrict__ qkv,  // [tokens, (heads + 2 kv_heads) * DIM]
    const typename D::T* __restrict__ cos,  // [positions, DIM / 2]
    const typename D::T* __restrict__ sin,
    const u32* __restrict__ positions,  // [tokens]
    const u32* __restrict__ slots,  // [tokens]
    typename D::T* __restrict__ k_cache,  // [slots, kv_heads, DIM]
    typename D::T* __restrict__ v_cache,
    int heads, int kv_heads, int interleaved) {
    const int t = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const int half = DIM / 2;
    if (i >= half) return;
    const u64 stride = (u64)(heads + 2 * kv_heads) * DIM;
    const u64 p = positions[t];
    const float c = D::load(cos[p * half + i]), s = D::load(sin[p * half + i]);
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    typename D::T* x = qkv + t * stride + (u64)h * DIM;
    const float xa = D::load(x[a]), xb = D::load(x[b]);
    const typename D::T ra = D::store(xa * c - xb * s), rb = D::store(xa * s + xb * c);
    x[a] = ra;
    x[b] = rb;
    const u32 slot = slots[t];
    if (h >= heads && slot != PADDING_SLOT) {
        const int g = h - heads;
        const u64 at = ((u64)slot * kv_heads + g) * DIM;
        const typename D::T* v = qkv + t * stride + (u64)(heads + kv_heads + g) * DIM;
        k_cache[at + a] = ra;
        k_cache[at + b] = rb;
        v_cache[at + a] = v[a];
        v_cache[at + b] = v[b];
    }
}

// Partial attention results of one query head merged by their maxima (online softmax): result k
// has maximum m[k * step], sum l[k * step] (0 where it saw no position, skipped) and weighted
// values acc[k * step * DIM + e]; the merged maximum, and element e's weighted sum and total.
struct Merged {
    float top, num, den;
};
__device__ __forceinline__ Merged merge_partials(const float* m, const float* l, const float* acc,
                                                 int n, int step, int e) {
    Merged r = {neg_infinity(), 0.0f, 0.0f};
    for (int k = 0; k < n; ++k) r.top = fmaxf(r.top, m[k * step]);
    for (int k = 0; k < n; ++k) {
        if (l[k * step] == 0.0f) continue;
        const float c = __expf(m[k * step] - r.top);
        r.num += acc[(u64)k * step * DIM + e] * c;
        r.den += l[k * step] * c;
    }
    return r;
}

// grid (tokens, kv_heads, splits), block (32 * warps), warps <= WARPS. With splits > 1 the block
// of split s takes the s-th of `splits` equal runs of the token's positions and writes its
// unnormalized partial result (maximum, sum, weighted values) to `split_out` for
// paged_attention_merge; with 1 it takes them all and writes `out`.
template <typename D>
__device__ void paged_attention(
    typename D::T* __restrict__ out,  // [tokens, heads * DIM]
    const typename D::T* __restrict__ q,  // [tokens, q_stride]: query head h at h * DIM
    u64 q_stride,
    const typename D::T* __restrict__ k_cache,  // [slots, kv_heads, DIM]
    const typename D::T* __restrict__ v_cache,
    const u32* __restrict__ block_tables,  // [sequences, max_blocks]
    const u32* __restrict__ token_seq,  // [tokens]
    const u32* __restrict__ token_pos,  // [tokens]
    float scale, int kv_heads, int block_size, int max_blocks,
    float* __restrict__ split_out) {  // splits > 1: [3][tokens, kv_heads, splits, GROUP] (x DIM)
    const int t = blockIdx.x, g = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const u32* table = block_tables + (u64)token_seq[t] * max_blocks;
    const int len = (int)token_pos[t] + 1;
    const int run = (len + splits - 1) / splits;
    const int begin = split * run, end = min(len, begin + run);
    const int heads = kv_heads * GROUP;

    float qv[GROUP][PER_LANE], acc[GROUP][PER_LANE], m[GROUP], l[GROUP];
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        const typename D::T* qh = q + t * q_stride + (u64)(g * GROUP + h) * DIM;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            qv[h][i] = D::load(qh[lane + 32 * i]) * scale;
            acc[h][i] = 0.0f;
        }
        m[h] = neg_infinity();
        l[h] = 0.0f;
    }
    for (int j = begin + warp; j < end; j += warps) {
        const u64 slot = (u64)table[j / block_size] * block_size + j % block_size;
        const typename D::T* kr = k_cache + (slot * kv_heads + g) * DIM;
        const typename D::T* vr = v_cache + (slot * kv_heads + g) * DIM;
        float kv[PER_LANE], vv[PER_LANE];
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            kv[i] = D::load(kr[lane + 32 * i]);
            vv[i] = D::load(vr[lane + 32 * i]);
        }
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) s += qv[h][i] * kv[i];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            const float top = fmaxf(m[h], s);
            const float rescale = __expf(m[h] - top);  // 0 at the first position (m = -inf)
            const float p = __expf(s - top);
            l[h] = l[h] * rescale + p;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) acc[h][i] = acc[h][i] * rescale + p * vv[i];
            m[h] = top;
        }
    }
    // Each warp's maxima, sums and accumulators, [warps][GROUP] and [warps][GROUP][DIM]: sized
    // by the launch (the host gives warps * GROUP * (DIM + 2) floats), so that a block of few
    // warps holds no more than it uses.
    extern __shared__ float partials[];
    float* shared_m = partials;
    float* shared_l = partials + warps * GROUP;
    float* shared_acc = partials + 2 * warps * GROUP;
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
        const int at = warp * GROUP + h;
        if (lane == 0) {
            shared_m[at] = m[h];
            shared_l[at] = l[h];
        }
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) shared_acc[at * DIM + lane + 32 * i] = acc[h][i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GROUP * DIM; idx += blockDim.x) {
        const int h = idx / DIM, e = idx % DIM;
        // The warps' results (a warp that saw no position has sum 0).
        const Merged r =
            merge_partials(shared_m + h, shared_l + h, shared_acc + h * DIM, warps, GROUP, e);
        if (splits == 1) {
            out[(u64)t * heads * DIM + (u64)(g * GROUP + h) * DIM + e] = D::store(r.num / r.den);
        } else {
            // A split past the token's last position saw nothing: sum 0, which the merge skips.
            const u64 count = (u64)gridDim.x * kv_heads * splits * GROUP;
            const u64 p = (((u64)t * kv_heads + g) * splits + split) * GROUP + h;
            if (e == 0) {
                split_out[p] = r.top;
                split_out[count + p] = r.den;
            }
            split_out[2 * count + p * DIM + e] = r.num;
        }
    }
}

// grid (tokens, kv_heads), block 256: each token's attention from its splits' partial results.
template <typename D>
__device__ void paged_attention_merge(typename D::T* __restrict__ out,  // [tokens, heads * DIM]
                                      const float* __restrict__ partials, int kv_heads,
                                      int splits) {
    const int t = blockIdx.x, g = blockIdx.y;
    const int heads = kv_heads * GROUP;
    const u64 count = (u64)gridDim.x * kv_heads * splits * GROUP;
    for (int idx = threadIdx.x; idx < GROUP * DIM; idx += blockDim.x) {
        const int h = idx / DIM, e = idx % DIM;
        const u64 first = ((u64)t * kv_heads + g) * splits * GROUP + h;
        const Merged r = merge_partials(partials + first, partials + count + first,
                                        partials + 2 * count + first * DIM, splits, GROUP, e);
        out[(u64)t * heads * DIM + (u64)(g * GROUP + h) * DIM + e] = D::store(r.num / r.den);
    }
}

// grid (tokens, ceil(ffn / 256)), block 256: SiLU(gate) x up of each token's [gate | up] row, in
// f32, rounded once — what SwiGLU's two element-wise ops do, in one pass over contiguous rows.
template <typename D>
__device__ void silu_and_mul(typename D::T* __restrict__ out,  // [tokens, ffn]
                             const typename D::T* __restrict__ gate_up,  // [tokens, 2 ffn]
                             int ffn) {
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const u64 t = blockIdx.x;
    const typename D::T* row = gate_up + t * 2 * (u64)ffn;
    const float g = D::load(row[i]), u = D::load(row[ffn + i]);
    out[t * (u64)ffn + i] = D::store(g / (1.0f + __expf(-g)) * u);
}

#define INSTANTIATE(NAME, D)                                                                    \
    extern "C" __global__ void rope_and_cache_##NAME(                                           \
        D::T* qkv, const D::T* cos, const D::T* sin, const u32* positions, const u32* slots,    \
        D::T* k_cache, D::T* v_cache, int heads, int kv_heads, int interleaved) {               \
        rope_and_cache<D>(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads,   \
                          interleaved);                                                          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) paged_attention_##NAME(            \
        D::T* out, const D::T* q, u64 q_stride, const D::T* k_cache, const D::T* v_cache,       \
        const u32* block_tables, const u32* token_seq, const u32* token_pos, float scale,       \
        int kv_heads, int block_size, int max_blocks, float* partials) {                        \
        paged_attention<D>(out, q, q_stride, k_cache, v_cache, block_tables, token_seq,          \
                           token_pos, scale, kv_heads, block_size, max_blocks, partials);       \
    }                                                                                           \
    extern "C" __global__ void paged_attention_merge_##NAME(D::T* out, const float* partials,   \
                                                            int kv_heads, int splits) {         \
        paged_attention_merge<D>(out, partials, kv_heads, splits);                              \
    }                                                                                           \
    extern "C" __global__ void silu_and_mul_##NAME(D::T* out, const D::T* gate_up, int ffn) {   \
        silu_and_mul<D>(out, gate_up, ffn);                                                     \
    }

INSTANTIATE(bf16, Bf16)
INSTANTIATE(f16, F16)
INSTANTIATE(f32, F32)

// sample_rows_f32: one token per row of f32 logits, as sampling.rs's `draw_token` picks it.
// `draws` holds four words a row: temperature (f32 bits), top_k, top_p (f32 bits), uniform (f32
// bits). One block of SAMPLE_THREADS threads per row. Temperature 0 is greedy (the first largest
// logit). Otherwise z = logit x (1 / temperature); the top-k threshold is the k-th largest z, found
// exactly by a bitwise search over the floats' ordered bit patterns (32 counting passes); the
// nucleus threshold is the largest z whose tokens at or above it hold top_p of the kept mass
// (32 summing passes); then each thread sums the kept weights exp(z - max) of its contiguous
// slice of the vocabulary, the slices' sums are scanned in order, and the first token at which
// the running sum reaches uniform x total wins.

#define SAMPLE_THREADS 1024

__device__ __forceinline__ u32 ordered(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The block's sum of `v` (float weights, u32 counts); every thread gets it.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    T total = 0;
    for (int w = 0; w < SAMPLE_THREADS / 32; ++w) total += scratch[w];
    return total;
}

__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float best = scratch[0];
    for (int w = 1; w < SAMPLE_THREADS / 32; ++w) best = fmaxf(best, scratch[w]);
    return best;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows_f32(u32* out, const float* logits, const u32* draws, int vocab) {
    __shared__ float fscratch[SAMPLE_THREADS / 32];
    __shared__ u32 uscratch[SAMPLE_THREADS / 32];
    __shared__ float prefix[SAMPLE_THREADS];
    __shared__ u32 chosen;
    __shared__ u32 last_kept;
    const float* row = logits + (u64)blockIdx.x * vocab;
    const u32* draw = draws + 4 * blockIdx.x;
    const float temperature = __uint_as_float(draw[0]);
    const u32 top_k = draw[1];
    const float top_p = __uint_as_float(draw[2]);
    const float uniform = __uint_as_float(draw[3]);
    const int t = threadIdx.x;

    if (temperature == 0.0f) {
        // Greedy: the largest logit, the lowest index among equals.
        float best = neg_infinity();
        u32 at = 0xffffffffu;
        for (int i = t; i < vocab; i += SAMPLE_THREADS) {
            if (row[i] > best) { best = row[i]; at = i; }
        }
        float top = block_max(best, fscratch);
        if (t == 0) chosen = 0xffffffffu;
        __syncthreads();
        if (best == top) atomicMin(&chosen, at);
        __syncthreads();
        if (t == 0) out[blockIdx.x] = chosen == 0xffffffffu ? 0 : chosen;
        return;
    }

    const float inverse = 1.0f / temperature;
    float local_max = neg_infinity();
    for (int i = t; i < vocab; i += SAMPLE_THREADS) local_max = fmaxf(local_max, row[i] * inverse);
    const float max = block_max(local_max, fscratch);

    // Top-k: the largest key K with at least k tokens at or above it.
    u32 threshold = 0;
    if (top_k > 0 && top_k < (u32)vocab) {
        for (int bit = 31; bit >= 0; --bit) {
            const u32 candidate = threshold | (1u << bit);
            u32 count = 0;
            for (int i = t; i < vocab; i += SAMPLE_THREADS) count += ordered(row[i] * inverse) >= candidate;
            if (block_sum(count, uscratch) >= top_k) threshold = candidate;
        }
    }
    // Top-p: the largest key P whose kept tokens at or above it hold top_p of the kept mass.
    if (top_p < 1.0f) {
        float mass = 0.0f;
        for (int i = t; i < vocab; i += SAMPLE_THREADS) {
            const float z = row[i] * inverse;
            if (ordered(z) >= threshold) mass += expf(z - max);
        }
        const float wanted = top_p * block_sum(mass, fscratch);
        u32 nucleus = 0;
        for (int bit = 31; bit >= 0; --bit) {
            const u32 candidate = nucleus | (1u << bit);
            const u32 at_least = candidate > threshold ? candidate : threshold;
            float part = 0.0f;
            for (int i = t; i < vocab; i += SAMPLE_THREADS) {
                const float z = row[i] * inverse;
                if (ordered(z) >= at_least) part += expf(z - max);
            }
            if (block_sum(part, fscratch) >= wanted) nucleus = candidate;
        }
        if (nucleus > threshold) threshold = nucleus;
    }

    // Each thread's contiguous slice, its kept mass, and the slices scanned in order.
    const int slice = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int begin = t * slice;
    const int end = min(begin + slice, vocab);
    float mine = 0.0f;
    for (int i = begin; i < end; ++i) {
        const float z = row[i] * inverse;
        if (ordered(z) >= threshold) mine += expf(z - max);
    }
    prefix[t] = mine;
    if (t == 0) { chosen = 0xffffffffu; last_kept = 0; }
    __syncthreads();
    if (t == 0) {
        float running = 0.0f;
        for (int i = 0; i < SAMPLE_THREADS; ++i) {
            const float here = prefix[i];
            prefix[i] = running;
            running += here;
        }
        fscratch[0] = running;
    }
    __syncthreads();
    const float target = uniform * fscratch[0];
    float running = prefix[t];
    for (int i = begin; i < end; ++i) {
        const float z = row[i] * inverse;
        const float w = ordered(z) >= threshold ? expf(z - max) : 0.0f;
        if (w <= 0.0f) continue;
        running += w;
        atomicMax(&last_kept, (u32)i);
        if (running >= target) { atomicMin(&chosen, (u32)i); break; }
    }
    __syncthreads();
    if (t == 0) out[blockIdx.x] = chosen != 0xffffffffu ? chosen : last_kept;
}
